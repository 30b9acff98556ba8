"""What every fstests suite shares: mounting kernel overlayfs and stratafs, describing a tree
so that two trees can be compared, and the pass/fail bookkeeping.

Why one module: the suites differ only in their fixtures and scenarios; how a tree is
described (and so what "identical to kernel overlayfs" means) must be the same everywhere.
"""

import ctypes
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(REPO, "target/release/stratafs")
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_void_p]

# Times far in the past that fixtures stamp on every object, so that times can be compared.
FIXTURE_TIME_NS = 1_000_000_000_000_000_000


# ---------------------------------------------------------------- mounts

def is_mounted(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == real for line in f)


def fstype(path):
    """The filesystem type mounted at `path` ("" when nothing is)."""
    real = os.path.realpath(path)
    found = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == real:
                found = fields[fields.index("-") + 1]
    return found


def unmount(path):
    """Unmounts `path` if it is a mount point (lazily as a last resort)."""
    for cmd in (["umount", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stderr=subprocess.DEVNULL)


CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


def enter_private_mount_namespace():
    """Moves this process (and the daemons it starts) to a mount namespace of its own.

    Why: a mount namespace that any other process creates while our union is mounted
    (`unshare -m`, a container, another test suite) gets a copy of the mount; our umount then
    removes only our copy, the FUSE superblock stays alive and the stratafs daemon does not
    exit. In a private namespace our mounts are invisible to everyone else."""
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE,
                                                    None) != 0:
        err = ctypes.get_errno()
        print(f"note: staying in the shared mount namespace ({os.strerror(err)})")


def unmount_all_under(top):
    """Unmounts every mount below `top`, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [ln.split(" ")[4] for ln in f]
    for m in sorted((p for p in points if p.startswith(top + "/")), key=len, reverse=True):
        unmount(m)


def overlay_opts(lowers, upper=None, work=None):
    opts = "lowerdir=" + ":".join(lowers)
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    return opts


def mount_kernel(lowers, upper, work, mnt, extra="", cwd=None):
    """Mounts kernel overlayfs; `lowers` topmost first."""
    opts = overlay_opts(lowers, upper, work) + (f",{extra}" if extra else "")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], check=True,
                   stderr=subprocess.PIPE, cwd=cwd)


def strata_extra_opts():
    """Options every stratafs mount of a suite gets on top of its own (`STRATAFS_EXTRA_OPTS`,
    set by run.py for the io_uring variants of suites)."""
    return os.environ.get("STRATAFS_EXTRA_OPTS", "")


def mount_strata(binary, lowers, upper, work, mnt, extra="", cwd=None):
    """Mounts stratafs with the fuse-overlayfs command line; returns once the mount is live."""
    extra = ",".join(o for o in (extra, strata_extra_opts()) if o)
    opts = overlay_opts(lowers, upper, work) + (f",{extra}" if extra else "")
    subprocess.run([binary, "-o", opts, mnt], check=True, stderr=subprocess.PIPE, timeout=60,
                   cwd=cwd)


# ---------------------------------------------------------------- describing trees

class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def file_handle(path):
    fh = FileHandle()
    fh.handle_bytes = 128
    mount_id = ctypes.c_int()
    r = libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id),
                               0x100)  # AT_SYMLINK_NOFOLLOW
    if r != 0:
        return None
    return (fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]))


def handle_map(layers):
    """(handle type, handle bytes) -> 'NAME:/path' for every object of the given layers
    ({name: root})."""
    out = {}
    for name, root in layers.items():
        for dirpath, dirnames, filenames in os.walk(root):
            for n in [""] + dirnames + filenames:
                p = os.path.join(dirpath, n) if n else dirpath
                h = file_handle(p)
                if h:
                    out[h] = f"{name}:/" + os.path.relpath(p, root)
    return out


def describe_xattr(name, value, handles):
    """An xattr as text; an overlay.origin is shown as the lower object it names (file
    handles differ between copies of a fixture) and overlay.uuid's random value is masked."""
    if name.endswith("overlay.origin") and len(value) >= 21:
        key = (value[4], bytes(value[21:]))
        return f"{name}=<origin {handles.get(key, 'unknown')}>"
    if name.endswith("overlay.uuid"):
        return f"{name}=<uuid>"
    if len(value) > 64:
        return f"{name}=<{len(value)} bytes sha={hashlib.sha256(value).hexdigest()[:12]}>"
    return f"{name}={value!r}"


def _xattrs(p, handles):
    try:
        names = sorted(os.listxattr(p, follow_symlinks=False))
    except OSError as e:
        return [f"listxattr-errno={e.errno}"]
    out = []
    for name in names:
        if name == "security.selinux":
            continue
        try:
            v = os.getxattr(p, name, follow_symlinks=False)
        except OSError as e:
            v = f"<errno {e.errno}>".encode()
        out.append(describe_xattr(name, v, handles))
    return out


def _content(p, st):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"size={st.st_size} sha={h.hexdigest()[:12]}"


def snapshot(root, handles=None, times=False, inodes=False):
    """path -> description of every object under `root` (not following symlinks): type, mode,
    owner, link count, content hash, symlink target, device numbers, xattrs; with `times`
    the mtime of every object; with `inodes` which objects share an inode number and whether
    readdir's d_ino equals st_ino."""
    out = {}
    first_of_ino = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d_inos = {}
        if inodes:
            try:
                with os.scandir(dirpath) as it:
                    d_inos = {e.name: e.inode() for e in it}
            except OSError:
                pass
        for n in [""] + dirnames + sorted(filenames):
            p = os.path.join(dirpath, n) if n else dirpath
            rel = os.path.relpath(p, root)
            try:
                st = os.lstat(p)
            except OSError as e:
                out[rel] = f"lstat errno={e.errno}"
                continue
            d = [stat.filemode(st.st_mode), f"{st.st_uid}:{st.st_gid}", f"nlink={st.st_nlink}"]
            try:
                if stat.S_ISREG(st.st_mode):
                    d.append(_content(p, st))
                elif stat.S_ISLNK(st.st_mode):
                    d.append("-> " + os.readlink(p))
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    d.append(f"rdev={os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
            except OSError as e:
                d.append(f"read errno={e.errno}")
            if times or not stat.S_ISDIR(st.st_mode):
                d.append(f"mtime={st.st_mtime_ns}")
            if inodes:
                if n and d_inos.get(n) != st.st_ino:
                    d.append(f"d_ino-mismatch({d_inos.get(n)}!={st.st_ino})")
                seen = first_of_ino.setdefault(st.st_ino, rel)
                if seen != rel:
                    d.append(f"same-ino-as={seen}")
            d += _xattrs(p, handles or {})
            out[rel] = " ".join(d)
    return out


def scrub_mtimes(snap):
    """Operations that stamp the current time make mtimes differ between two runs."""
    return {k: " ".join(w for w in v.split() if not w.startswith("mtime=")) for k, v in snap.items()}


def diff(a, b, label, limit=12):
    """Lines describing where two snapshots differ (kernel first)."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"  {label} {k}: kernel={a.get(k)} stratafs={b.get(k)}")
    return lines[:limit] + ([f"  ... {len(lines) - limit} more"] if len(lines) > limit else [])


def stamp_times(root):
    """Gives every object under `root` the fixture time, so fixtures built twice compare."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(FIXTURE_TIME_NS, FIXTURE_TIME_NS),
                     follow_symlinks=False)
    os.utime(root, ns=(FIXTURE_TIME_NS, FIXTURE_TIME_NS))


# ---------------------------------------------------------------- running

def run_ops(mnt, script, timeout=120, env=None):
    """Runs a shell snippet in `mnt`; returns its output and exit code with the mount path
    replaced by MNT. $PROBE names fstests/probe.py; `env` adds variables."""
    env = {**os.environ, "LC_ALL": "C", "PROBE": f"python3 {PROBE}", **(env or {})}
    p = subprocess.run(["bash", "-c", script], cwd=mnt, capture_output=True, text=True,
                       timeout=timeout, env=env, errors="replace")
    text = (p.stdout + p.stderr).replace(mnt, "MNT")
    return f"{text}exit={p.returncode}"


def can_run(binary):
    return os.geteuid() == 0 and os.path.exists("/dev/fuse") and os.path.exists(binary)


def run_suite(title, todo, run_one, verbose=False):
    """Runs `run_one(tmpdir, scenario)` -> list of problems for each scenario, printing PASS or
    FAIL lines and ending with "N passed, M failed". Returns the failure count."""
    passed = failed = 0
    started = time.time()

    def on_alarm(signum, frame):
        raise TimeoutError("scenario took too long")

    signal.signal(signal.SIGALRM, on_alarm)
    for sc in todo:
        tmp = tempfile.mkdtemp(prefix="fst-")
        signal.alarm(300)
        try:
            problems = run_one(tmp, sc)
        except Exception as e:  # a broken scenario is a failure, not a crash of the suite
            problems = [f"  error: {type(e).__name__}: {e}"]
        finally:
            signal.alarm(0)
            unmount_all_under(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        if problems:
            failed += 1
            print(f"FAIL {sc.name}")
            print("\n".join(problems))
        else:
            passed += 1
            print(f"PASS {sc.name}")
    print(f"{title}: {len(todo)} scenarios in {time.time() - started:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return failed
