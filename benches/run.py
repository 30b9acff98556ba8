#!/usr/bin/env python3
"""Benchmark runner for stratafs: the same workloads on kernel overlayfs, fuse-overlayfs 1.10,
fuse-overlayfs 2.0, stratafs (as root and rootless in a user namespace) and a plain directory.

Why: stratafs claims to be a fast drop-in for fuse-overlayfs with the semantics of kernel
overlayfs. That claim needs numbers taken the same way every time: the same fixture (a copy of
/usr as the bottom layer, a layer of whiteouts and overrides, a small top layer), the same
realistic commands (find, ls -lR, dd, fio, tar, rm -rf, mv, ...), fresh mounts with empty
upper dirs so that write workloads start equal, targets interleaved (A B C A B C ...) so that
drifts of the machine hit every target alike, and results stored with the machine facts.
Kernel overlayfs is the reference (ratio 1.0); the plain directory is the floor.

How:
  python3 benches/run.py                      # all available targets, all workloads, 3 reps
  python3 benches/run.py --small --reps 1     # quick smoke run (128 MiB file, 4k creates)
  python3 benches/run.py --size large         # bottom layer = a copy of all of /usr
  python3 benches/run.py --targets kernel,strata --workloads metadata,copyup-append
  python3 benches/run.py --list               # workloads and targets
Everything happens on a journaled ext4 in /var/tmp/stratafs-bench.img (sparse, made on first
use), loop-mounted on /var/tmp/stratafs-bench; fixtures are built there once and kept between
runs (--rebuild rebuilds). Results: benches/results/<date>-<host>[-SIZE].{md,json,svg}
(--out DIR to change).
Needs root, /dev/fuse, fio, kernel overlayfs; Python 3 stdlib only. It runs in a private mount
namespace of its own (mounts are invisible to the rest of the machine and vanish with it).
A rootless target runs each measurement (mount, workload, unmount) in one child re-executed
through fstests/userns.py ("--_inner"), which asks the parent over a pipe to drop caches.
"""

import argparse
import ctypes
import datetime
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
USERNS = os.path.join(REPO, "fstests", "userns.py")
BENCH_ROOT = "/var/tmp/stratafs-bench"
DEFAULT_STRATA = os.path.join(REPO, "target", "release", "stratafs")
FO1 = "/usr/bin/fuse-overlayfs"
FO2 = "/opt/peers/fuse-overlayfs-2/bin/fuse-overlayfs"
FIXTURE_VERSION = 3
MIB = 1 << 20

# name -> (kind, binary key, rootless)
TARGETS = {
    "kernel": ("kernel", None, False),
    "fo1": ("fuse", "fo1", False),
    "fo2": ("fuse", "fo2", False),
    "strata": ("fuse", "strata", False),
    "strata-rootless": ("fuse", "strata", True),
    "fo1-rootless": ("fuse", "fo1", True),
    "fo2-rootless": ("fuse", "fo2", True),
    "plain": ("plain", None, False),
}
# Targets that are stratafs with more options: FUSE over io_uring (the run switches the
# kernel's fuse.enable_uring on while it lasts, and puts it back).
TARGETS["strata-uring"] = ("fuse", "strata", False)
TARGETS["strata-uring-rootless"] = ("fuse", "strata", True)
TARGET_OPTS = {"strata-uring": "io_uring", "strata-uring-rootless": "io_uring"}
ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"

DEFAULT_TARGETS = ["kernel", "fo1", "fo2", "strata", "strata-rootless", "fo1-rootless",
                   "fo2-rootless", "plain"]

# Sizes of the fixture and of the workloads. "standard" (the default) meets the bar of the
# performance issue (over 50k files, a 1 GiB file, 20k creates, a 10k-file tarball); "large"
# copies all of /usr; "small" is a smoke test, not a benchmark.
FULL = dict(source="/usr/share", big_mib=1024, dir_entries=10000, whiteouts=1000,
            overrides=1000, l1_files=200, tar_files=10000, deep_layers=100,
            seqwrite_mib=1024, randread_io_mib=64, randwrite_file_mib=256,
            randwrite_io_mib=64, fsync_writes=2000, create_files=20000, rss_walks=10,
            timeout=1800)
SIZES = {
    "standard": FULL,
    "large": FULL | dict(source="/usr"),
    "small": dict(source="/usr/share", big_mib=128, dir_entries=10000, whiteouts=1000,
                  overrides=1000, l1_files=200, tar_files=2000, deep_layers=100,
                  seqwrite_mib=128, randread_io_mib=16, randwrite_file_mib=64,
                  randwrite_io_mib=16, fsync_writes=500, create_files=4000, rss_walks=10,
                  timeout=600),
}
# The benchmark's own filesystem: a journaled ext4 in a sparse image file on a loop device
# (direct I/O, so pages are cached once), mounted in the runner's private mount namespace.
# The host's filesystem may lack a journal, and without one ext4 scans every recently deleted
# inode before allocating a new one: after a few create/delete rounds a plain `echo > f` costs
# 0.5 ms there, for every target alike, drowning the differences we measure.
IMAGE = "/var/tmp/stratafs-bench.img"
IMAGE_GIB = 40

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_void_p]


class Skip(Exception):
    """The workload does not apply to this target (not an error)."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, cwd=None, timeout=None, capture=False):
    """Runs `cmd` with bash in its own process group (killed whole on timeout); raises on a
    non-zero exit with the tail of stderr. Returns stdout when `capture`."""
    p = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate()
        raise
    if p.returncode != 0:
        raise RuntimeError(f"`{cmd}` exited {p.returncode}: {err.strip()[-400:]}")
    return out


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------- mounts

def mountpoints():
    with open("/proc/self/mountinfo") as f:
        return [ln.split(" ")[4] for ln in f]


def is_mounted(path):
    return os.path.realpath(path) in mountpoints()


def enter_private_mount_namespace():
    if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000,
                                                   None) != 0:
        log(f"note: staying in the shared mount namespace "
            f"({os.strerror(ctypes.get_errno())})")


def find_daemon(mnt):
    """PID of the FUSE daemon serving `mnt`: the process whose last argument is `mnt`."""
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        while args and args[-1] == b"":
            args.pop()
        if len(args) >= 2 and args[-1] == os.fsencode(mnt) and b"-o" in args:
            return int(d)
    return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except OSError:
        return False


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def set_enable_uring(value):
    """Sets the kernel's fuse.enable_uring (for the strata-uring targets); returns the old
    value."""
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    with open(ENABLE_URING, "w") as f:
        f.write(value)
    log(f"fuse.enable_uring: {old} -> {value}")
    return old


def do_mount(kind, binary, lowers, upper, work, mnt, cwd=None, extra=""):
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if extra:
        opts += "," + extra
    if kind == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts, mnt]
    else:
        cmd = [binary, "-o", opts, mnt]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"mount failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    deadline = time.monotonic() + 20
    while not is_mounted(mnt):
        if time.monotonic() > deadline:
            raise RuntimeError(f"mount of {mnt} did not appear: {r.stderr.strip()}")
        time.sleep(0.05)
    if kind == "kernel":
        return None
    pid = find_daemon(mnt)
    if pid is None:
        raise RuntimeError("mounted, but no daemon process found")
    return pid


def do_unmount(mnt, pid):
    for i in range(10):
        if not is_mounted(mnt):
            break
        subprocess.run(["umount", mnt], capture_output=True)
        if is_mounted(mnt):
            time.sleep(0.3 * (i + 1))
    if is_mounted(mnt):
        log(f"warning: {mnt} busy, lazy unmount")
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    if pid:
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            log(f"warning: daemon {pid} still alive 30 s after unmount, SIGKILL")
            os.kill(pid, signal.SIGKILL)


def rmtree(path):
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def fresh_dir(path):
    rmtree(path)
    os.makedirs(path)


def mount_image(image):
    """Mounts the benchmark filesystem (see IMAGE) on BENCH_ROOT, making it first if needed.
    Fixtures stay in the image between runs; delete the file to start over."""
    if not os.path.exists(image):
        log(f"making {image}: sparse {IMAGE_GIB} GiB ext4 with a journal")
        with open(image, "wb") as f:
            f.truncate(IMAGE_GIB << 30)
        sh(f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {shlex.quote(image)}")
    os.makedirs(BENCH_ROOT, exist_ok=True)
    if is_mounted(BENCH_ROOT):
        return
    dev = sh(f"losetup --find --show --direct-io=on {shlex.quote(image)}", capture=True).strip()
    try:
        sh(f"mount -t ext4 {dev} {BENCH_ROOT}")
    finally:
        # Detaches when unmounted (with this namespace at the latest).
        subprocess.run(["losetup", "-d", dev], capture_output=True)


# ---------------------------------------------------------------- fixtures

def copy_meta(src, dst):
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def mkdirs_like(layer, ref, rel, made):
    """Creates directory `rel` in `layer`, each new component with the metadata of the same
    directory in `ref` (as an image layer does: a layer's directory shows its own mode)."""
    cur = ""
    for part in rel.split("/"):
        cur = f"{cur}/{part}" if cur else part
        p = os.path.join(layer, cur)
        if not os.path.isdir(p):
            os.mkdir(p)
            made.append(cur)


def fix_dir_meta(layer, ref, made):
    for rel in sorted(made, key=len, reverse=True):
        copy_meta(os.path.join(ref, rel), os.path.join(layer, rel))


def count_entries(path):
    n = 0
    for _, dirs, files in os.walk(path):
        n += len(dirs) + len(files)
    return n


def pick_first(root, candidates):
    for c in candidates:
        if os.path.isdir(os.path.join(root, c)) and not os.path.islink(os.path.join(root, c)):
            return c
    raise RuntimeError(f"none of {candidates} exists under {root}")


def build_fixtures(fx, mode, rebuild):
    """Builds (or reuses) the fixture of `mode`; returns its meta dict."""
    meta_path = os.path.join(fx, "meta.json")
    if not rebuild and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("version") == FIXTURE_VERSION:
            return meta
        log("fixture version changed, rebuilding")
    sz = SIZES[mode]
    t0 = time.monotonic()
    for m in sorted((p for p in mountpoints() if p.startswith(fx + "/")), key=len,
                    reverse=True):
        do_unmount(m, None)
    rmtree(fx)
    os.makedirs(fx)
    L1, L2, L3 = (os.path.join(fx, n) for n in ("L1", "L2", "L3"))
    for d in (L1, L2, L3):
        os.mkdir(d)
    # L3 (bottom): a copy of /usr (or /usr/share), the big file, the 10k directory.
    src = sz["source"]
    rel_src = src.lstrip("/")
    log(f"fixture: cp -a {src} -> L3/{rel_src}")
    os.makedirs(os.path.dirname(os.path.join(L3, rel_src)), exist_ok=True)
    if os.path.dirname(rel_src):
        copy_meta("/usr", os.path.join(L3, "usr"))
    r = subprocess.run(["cp", "-a", src, os.path.join(L3, rel_src)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        log(f"note: cp -a {src} reported: {r.stderr.strip()[-300:]}")
    data = os.path.join(L3, "data")
    os.mkdir(data)
    log(f"fixture: data/big.bin ({sz['big_mib']} MiB random)")
    with open(os.path.join(data, "big.bin"), "wb") as f:
        for _ in range(sz["big_mib"]):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    d10k = os.path.join(data, "dir10k")
    os.mkdir(d10k)
    for i in range(sz["dir_entries"]):
        with open(os.path.join(d10k, f"f{i:05d}"), "w") as f:
            f.write(f"{i}\n")

    share = "usr/share"
    rm_target = f"{share}/" + pick_first(os.path.join(L3, share), ["doc", "man", "locale"])
    mv_target = f"{share}/" + pick_first(os.path.join(L3, share),
                                         ["zoneinfo", "perl", "X11", "i18n"])
    wh_dir = f"{share}/" + pick_first(os.path.join(L3, share),
                                      [n for n in ["i18n", "X11", "perl", "info"]
                                       if f"{share}/{n}" != mv_target])

    # L2: whiteouts (char 0/0) of ~1k files and of one directory; overrides of ~1k files.
    files = []
    for dirpath, dirs, names in os.walk(os.path.join(L3, "usr")):
        dirs.sort()
        rel_dir = os.path.relpath(dirpath, L3)
        if rel_dir == wh_dir or rel_dir.startswith(wh_dir + "/"):
            dirs[:] = []
            continue
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            if stat.S_ISREG(os.lstat(p).st_mode):
                files.append(os.path.join(rel_dir, n))
    want = sz["whiteouts"] + sz["overrides"]
    step = max(1, len(files) // want)
    chosen = files[::step][:want]
    made = []
    n_wh = n_ov = 0
    for i, rel in enumerate(chosen):
        mkdirs_like(L2, L3, os.path.dirname(rel), made)
        dst = os.path.join(L2, rel)
        if i % 2 == 0 and n_wh < sz["whiteouts"]:
            os.mknod(dst, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            n_wh += 1
        else:
            with open(dst, "w") as f:
                f.write(f"override {i} of {rel}\n" * 8)
            copy_meta(os.path.join(L3, rel), dst)
            n_ov += 1
    mkdirs_like(L2, L3, os.path.dirname(wh_dir), made)
    os.mknod(os.path.join(L2, wh_dir), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    fix_dir_meta(L2, L3, made)

    # L1 (top): a few added files, in a new directory and in existing ones.
    made = []
    mkdirs_like(L1, L3, f"{share}", made)
    mkdirs_like(L1, L3, "data", made)
    os.mkdir(os.path.join(L1, share, "l1-added"))
    for i in range(sz["l1_files"]):
        with open(os.path.join(L1, share, "l1-added", f"f{i:03d}"), "w") as f:
            f.write(f"added by L1: {i}\n")
    for i in range(20):
        with open(os.path.join(L1, "data", f"l1-{i:02d}"), "w") as f:
            f.write(f"L1 data {i}\n")
    fix_dir_meta(L1, L3, made)

    # The tarball for untar: tar_files files in 100 directories, 0-16 KiB each.
    log(f"fixture: untar.tar ({sz['tar_files']} files)")
    rnd = random.Random(42)
    with tarfile.open(os.path.join(fx, "untar.tar"), "w") as tar:
        per = sz["tar_files"] // 100
        for d in range(100):
            ti = tarfile.TarInfo(f"tree/d{d:02d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(ti)
            for i in range(per):
                payload = rnd.randbytes(rnd.randrange(0, 16384))
                ti = tarfile.TarInfo(f"tree/d{d:02d}/f{i:04d}")
                ti.size, ti.mode, ti.mtime = len(payload), 0o644, 1_700_000_000
                tar.addfile(ti, io.BytesIO(payload))

    # The deep stack: layers deep/00 (top) .. deep/99 (bottom), merged dirs shared/sub*.
    deep = os.path.join(fx, "deep")
    os.mkdir(deep)
    nl = sz["deep_layers"]
    for li in range(nl):
        lay = os.path.join(deep, f"{li:02d}")
        for s in range(10):
            sub = os.path.join(lay, "shared", f"sub{s}")
            os.makedirs(sub)
            for k in range(3):
                with open(os.path.join(sub, f"L{li:02d}-f{k}"), "w") as f:
                    f.write(f"layer {li} file {k}\n")
        with open(os.path.join(lay, "shared", "common.txt"), "w") as f:
            f.write(f"layer {li}\n")
        os.makedirs(os.path.join(lay, f"own{li:02d}"))
        with open(os.path.join(lay, f"own{li:02d}", "file"), "w") as f:
            f.write("x\n")
        if li == nl - 1:
            with open(os.path.join(lay, "shared", "sub0", "bottom-only"), "w") as f:
                f.write("only in the bottom layer\n")
    deep_lowers = [f"{i:02d}" for i in range(nl)]

    # Plain copies of the merged trees (the floor), taken through a read-only kernel mount.
    tmp_mnt = os.path.join(fx, "mnt-tmp")
    for name, lowers, cwd in (("plain-main", [L1, L2, L3], None),
                              ("plain-deep", deep_lowers, deep)):
        log(f"fixture: {name} (copy of the merged tree)")
        os.makedirs(tmp_mnt, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        "ro,lowerdir=" + ":".join(lowers), tmp_mnt], check=True, cwd=cwd)
        try:
            subprocess.run(["cp", "-a", tmp_mnt + "/.", os.path.join(fx, name)], check=True)
        finally:
            do_unmount(tmp_mnt, None)
    os.rmdir(tmp_mnt)

    # Two halves of the tree (by entry count) for the parallel find.
    walk_root = "usr" if os.path.isdir(os.path.join(L3, "usr", "lib")) else share
    pm = os.path.join(fx, "plain-main")
    kids = sorted(os.listdir(os.path.join(pm, walk_root)))
    weights = {k: (count_entries(os.path.join(pm, walk_root, k)) + 1
                   if os.path.isdir(os.path.join(pm, walk_root, k)) and
                   not os.path.islink(os.path.join(pm, walk_root, k)) else 1) for k in kids}
    groups, load = ([], []), [0, 0]
    for k in sorted(kids, key=lambda k: -weights[k]):
        g = 0 if load[0] <= load[1] else 1
        groups[g].append(f"{walk_root}/{k}")
        load[g] += weights[k]

    big_rel = "data/big.bin"
    meta = {
        "version": FIXTURE_VERSION, "mode": mode, "sizes": sz, "fx": fx,
        "lowers": [L1, L2, L3], "deep_dir": deep, "deep_lowers": deep_lowers,
        "tarball": os.path.join(fx, "untar.tar"),
        "big": big_rel, "big_size": os.path.getsize(os.path.join(L3, big_rel)),
        "big_mode": stat.S_IMODE(os.stat(os.path.join(L3, big_rel)).st_mode),
        "dir10k": "data/dir10k", "rm_target": rm_target, "mv_target": mv_target,
        "whiteout_dir": wh_dir, "whiteouts": n_wh + 1, "overrides": n_ov,
        "par_groups": [sorted(g) for g in groups], "par_loads": load,
        "merged_entries": count_entries(pm),
        "deep_entries": count_entries(os.path.join(fx, "plain-deep")),
        "rm_entries": count_entries(os.path.join(pm, rm_target)),
        "l3_entries": count_entries(L3),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    subprocess.run(["sync"])
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    log(f"fixture ready in {meta['build_seconds']} s: {meta['merged_entries']} merged entries")
    return meta


# ---------------------------------------------------------------- workloads

class Ctx:
    """One measurement: the tree to work in, the daemon (if any) and the knobs."""

    def __init__(self, root, meta, pid, drop, timeout):
        self.root, self.meta, self.pid, self._drop, self.timeout = root, meta, pid, drop, timeout
        self.sz = meta["sizes"]

    def drop(self):
        self._drop()

    def run(self, cmd, capture=False):
        return sh(cmd, cwd=self.root, timeout=self.timeout, capture=capture)

    def timed(self, cmd, capture=False):
        """Wall time of `cmd` alone (pending writeback is flushed before the clock starts)."""
        os.sync()
        t0 = time.monotonic()
        out = sh(cmd, cwd=self.root, timeout=self.timeout, capture=capture)
        dt = time.monotonic() - t0
        return (dt, out) if capture else dt

    def newdir(self):
        os.makedirs(os.path.join(self.root, "bench-new"), exist_ok=True)
        return "bench-new"


class Workload:
    def __init__(self, name, group, fn, unit="s", deep=False, fuse_only=False, restore=None,
                 metrics=None, doc=""):
        self.name, self.group, self.fn, self.unit = name, group, fn, unit
        self.deep, self.fuse_only, self.restore = deep, fuse_only, restore
        self.metrics = metrics or [(name, unit)]
        self.doc = doc


WORKLOADS = []


def workload(name, group, **kw):
    def deco(fn):
        WORKLOADS.append(Workload(name, group, fn, doc=(fn.__doc__ or "").strip(), **kw))
        return fn
    return deco


def check_count(out, want, what):
    got = int(out.strip().split()[0])
    if got != want:
        raise RuntimeError(f"{what}: {got} entries, expected {want}")


FIND = "find . | wc -l"
STAT = "find . -printf '%s %i\\n' | wc -l"


def timed_walk(c, cmd, warm, what):
    """Times `cmd` (a walk printing one line per entry, counted by `wc -l`) after dropping the
    caches, or after one untimed run when `warm`, and checks it saw every merged entry."""
    if warm:
        c.run(cmd)
    else:
        c.drop()
    dt, out = c.timed(cmd, capture=True)
    check_count(out, c.meta["merged_entries"] + 1, what)
    return dt


@workload("find-cold", "metadata")
def w_find_cold(c):
    """`find . | wc -l` over the merged tree, caches dropped first."""
    return timed_walk(c, FIND, False, "find")


@workload("find-warm", "metadata")
def w_find_warm(c):
    """`find . | wc -l` again after a first walk."""
    return timed_walk(c, FIND, True, "find")


@workload("stat-cold", "metadata")
def w_stat_cold(c):
    """`find . -printf '%s %i\\n'`: lstat of every entry, caches dropped first."""
    return timed_walk(c, STAT, False, "stat walk")


@workload("stat-warm", "metadata")
def w_stat_warm(c):
    """The stat walk again after a first one."""
    return timed_walk(c, STAT, True, "stat walk")


@workload("ls-lR-cold", "metadata")
def w_lslr_cold(c):
    """`ls -lR > /dev/null` (readdir + lstat + xattr probes), caches dropped first."""
    c.drop()
    return c.timed("ls -lR > /dev/null")


@workload("ls-lR-warm", "metadata")
def w_lslr_warm(c):
    """`ls -lR` again after a first one."""
    c.run("ls -lR > /dev/null")
    return c.timed("ls -lR > /dev/null")


@workload("readdir-10k-cold", "metadata")
def w_readdir_cold(c):
    """`ls -f data/dir10k` (readdir only) of the 10k-entry lower directory, cold."""
    c.drop()
    dt, out = c.timed(f"ls -f {c.meta['dir10k']} | wc -l", capture=True)
    check_count(out, c.sz["dir_entries"] + 2, "readdir")
    return dt


@workload("readdir-10k-warm", "metadata")
def w_readdir_warm(c):
    """`ls -f data/dir10k` again after a first one."""
    c.run(f"ls -f {c.meta['dir10k']} > /dev/null")
    return c.timed(f"ls -f {c.meta['dir10k']} > /dev/null")


def mibps(nbytes, dt):
    return nbytes / MIB / dt


def dd_read(c):
    return c.timed(f"dd if={c.meta['big']} of=/dev/null bs=1M status=none")


@workload("getxattr-20k", "metadata")
def w_getxattr(c):
    """20000 `lgetxattr(security.selinux)` of one lower file (absent, as `ls -l` asks for every
    entry): one request each on a FUSE mount, so this is the round-trip floor of ls -lR."""
    target = c.meta["big"]
    script = ("import os,sys\nfor _ in range(20000):\n try: os.getxattr(sys.argv[1],"
              "'security.selinux',follow_symlinks=False)\n except OSError: pass\n")
    c.run(f"ls -l {target} > /dev/null")
    return c.timed(f"python3 -c {shlex.quote(script)} {shlex.quote(target)}")


@workload("seqread-cold", "read", unit="MiB/s")
def w_seqread_cold(c):
    """`dd bs=1M of=/dev/null` of the 1 GiB lower file, cold."""
    c.drop()
    return mibps(c.meta["big_size"], dd_read(c))


@workload("seqread-warm", "read", unit="MiB/s")
def w_seqread_warm(c):
    """The same read again right after a first one (page cache of the mount)."""
    dd_read(c)
    return mibps(c.meta["big_size"], dd_read(c))


@workload("seqread-lower-cached", "read", unit="MiB/s")
def w_seqread_lower_cached(c):
    """`dd bs=1M` of the 1 GiB file with the lower file in the page cache but not the mount's
    own: the read path of the daemon without the disk (whose speed on a VM varies 2-5x)."""
    c.drop()
    # Without a daemon (kernel overlay, plain directory) the file read is the cached one.
    source = (os.path.join(c.meta["lowers"][2], c.meta["big"]) if c.pid is not None
              else os.path.join(c.root, c.meta["big"]))
    c.run(f"cat {shlex.quote(source)} > /dev/null")
    return mibps(c.meta["big_size"], dd_read(c))


@workload("randread-4k", "read", unit="MiB/s")
def w_randread(c):
    """fio randread bs=4k psync over the 1 GiB lower file, fixed io_size, cold."""
    io = c.sz["randread_io_mib"]
    c.drop()
    dt = c.timed(f"fio --name=randread --filename={c.meta['big']} --readonly --rw=randread "
                 f"--bs=4k --size={c.meta['big_size']} --io_size={io}m --ioengine=psync "
                 f"--randrepeat=1 --norandommap --output=/dev/null")
    return io / dt


@workload("seqwrite", "write", unit="MiB/s")
def w_seqwrite(c):
    """`dd if=/dev/zero bs=1M conv=fsync` of a new 1 GiB file."""
    n = c.sz["seqwrite_mib"]
    d = c.newdir()
    return n / c.timed(f"dd if=/dev/zero of={d}/seq.bin bs=1M count={n} conv=fsync "
                       f"status=none")


@workload("randwrite-4k", "write", unit="MiB/s")
def w_randwrite(c):
    """fio randwrite bs=4k psync into a new 256 MiB file (laid out first, untimed), fixed
    io_size, fsync at end."""
    d = c.newdir()
    fsz, io = c.sz["randwrite_file_mib"], c.sz["randwrite_io_mib"]
    common = f"--filename={d}/rand.bin --size={fsz}m --bs=4k --ioengine=psync --output=/dev/null"
    c.run(f"fio --name=layout {common} --create_only=1")
    dt = c.timed(f"fio --name=randwrite {common} --rw=randwrite --io_size={io}m "
                 f"--randrepeat=1 --norandommap --end_fsync=1")
    return io / dt


@workload("fsync-append", "write")
def w_fsync_append(c):
    """fio: 2000 x 4 KiB appends to a new file, fsync after each (a log/database pattern)."""
    d = c.newdir()
    n = c.sz["fsync_writes"]
    return c.timed(f"fio --name=fsync --filename={d}/log --rw=write --bs=4k --size={n * 4}k "
                   f"--file_append=1 --fallocate=none --fsync=1 --ioengine=psync "
                   f"--output=/dev/null")


@workload("create-delete", "namespace")
def w_create_delete(c):
    """bash: create 20k small files (20 dirs, `echo x > f`), then `rm -rf` them."""
    d = c.newdir()
    per = c.sz["create_files"] // 20
    return c.timed(f"cd {d} && mkdir cd && cd cd && for d in $(seq 20); do mkdir d$d; "
                   f"for i in $(seq {per}); do echo x > d$d/f$i; done; done && cd .. && "
                   f"rm -rf cd")


@workload("untar", "namespace")
def w_untar(c):
    """`tar -xf` of the 10k-file tarball (tarball read from the page cache) into a new dir."""
    d = c.newdir()
    c.run(f"cat {c.meta['tarball']} > /dev/null")
    return c.timed(f"tar -xf {c.meta['tarball']} -C {d}")


def restore_rm(c, pristine):
    t = c.meta["rm_target"]
    if count_entries(os.path.join(c.root, t)) != c.meta["rm_entries"]:
        rmtree(os.path.join(c.root, t))
        subprocess.run(["cp", "-a", os.path.join(pristine, t), os.path.join(c.root, t)],
                       check=True)


@workload("rm-rf-lower", "namespace", restore=restore_rm)
def w_rm_lower(c):
    """`rm -rf usr/share/doc`: a lower tree (whiteouts on an overlay), cold."""
    c.drop()
    return c.timed(f"rm -rf {c.meta['rm_target']}")


def restore_big(c, pristine):
    p = os.path.join(c.root, c.meta["big"])
    if os.path.getsize(p) != c.meta["big_size"]:
        os.truncate(p, c.meta["big_size"])
    if stat.S_IMODE(os.stat(p).st_mode) != c.meta["big_mode"]:
        os.chmod(p, c.meta["big_mode"])


@workload("copyup-append", "copy-up", restore=restore_big)
def w_copyup_append(c):
    """`echo >> data/big.bin`: first append to the 1 GiB lower file (full copy-up), cold."""
    c.drop()
    return c.timed(f"echo appended >> {c.meta['big']}")


@workload("copyup-chmod", "copy-up", restore=restore_big)
def w_copyup_chmod(c):
    """`chmod 600 data/big.bin`: metadata change of the 1 GiB lower file, cold."""
    c.drop()
    return c.timed(f"chmod 600 {c.meta['big']}")


def restore_mv(c, pristine):
    t = os.path.join(c.root, c.meta["mv_target"])
    moved = t + ".moved"
    if os.path.lexists(moved):
        rmtree(t)
        os.rename(moved, t)


@workload("rename-dir", "copy-up", restore=restore_mv)
def w_rename_dir(c):
    """`mv usr/share/zoneinfo usr/share/zoneinfo.moved`: a lower directory (with
    redirect_dir off the kernel answers EXDEV and mv copies the tree), cold."""
    c.drop()
    t = c.meta["mv_target"]
    return c.timed(f"mv {t} {t}.moved")


@workload("par-find-cold", "parallel")
def w_par_find(c):
    """Two concurrent `find -printf` walks over the two halves of the tree, cold."""
    a, b = (" ".join(shlex.quote(x) for x in g) for g in c.meta["par_groups"])
    c.drop()
    return c.timed(f"find {a} -printf '%s %i\\n' > /dev/null & p=$!; "
                   f"find {b} -printf '%s %i\\n' > /dev/null; wait $p")


@workload("par-seqread-cold", "parallel", unit="MiB/s")
def w_par_read(c):
    """Two concurrent `dd bs=1M` reads of the two halves of the 1 GiB file, cold."""
    half = c.meta["big_size"] // MIB // 2
    big = c.meta["big"]
    c.drop()
    dt = c.timed(f"dd if={big} of=/dev/null bs=1M count={half} status=none & p=$!; "
                 f"dd if={big} of=/dev/null bs=1M skip={half} count={half} status=none; "
                 f"wait $p")
    return 2 * half / dt


DEEP = "find . -printf '%s %i\\n' | wc -l; stat -c %s shared/sub0/bottom-only"


@workload("deep-stat-cold", "deep", deep=True)
def w_deep_cold(c):
    """Stat walk of the 100-layer stack + stat of the file only the bottom layer has, cold."""
    c.drop()
    dt, out = c.timed(DEEP, capture=True)
    check_count(out, c.meta["deep_entries"] + 1, "deep walk")
    return dt


@workload("deep-stat-warm", "deep", deep=True)
def w_deep_warm(c):
    """The same again after a first walk."""
    c.run(DEEP)
    return c.timed(DEEP)


@workload("rss", "memory", unit="MiB", fuse_only=True,
          metrics=[("rss-1walk", "MiB"), ("rss-10walks", "MiB")])
def w_rss(c):
    """Daemon peak RSS (VmHWM) after one cold stat walk, and after 9 more (warm) walks."""
    if c.pid is None:
        raise Skip()
    c.drop()
    c.run(STAT)
    r1 = vm_hwm_mib(c.pid)
    for _ in range(c.sz["rss_walks"] - 1):
        c.run(STAT)
    return {"rss-1walk": r1, "rss-10walks": vm_hwm_mib(c.pid)}


BY_NAME = {w.name: w for w in WORKLOADS}


# ---------------------------------------------------------------- one measurement

def measure(spec, drop):
    """Mounts `spec["target"]` fresh (empty upper/work), runs the workload, unmounts and cleans
    up. Returns {metric: value}; raises on failure, Skip when it does not apply."""
    target, w = spec["target"], BY_NAME[spec["workload"]]
    kind, binkey, _ = spec.get("tdef") or TARGETS[target]
    with open(os.path.join(spec["fx"], "meta.json")) as f:
        meta = json.load(f)
    timeout = meta["sizes"]["timeout"]
    if w.fuse_only and kind != "fuse":
        raise Skip()
    if kind == "plain":
        root = os.path.join(spec["fx"], "plain-deep" if w.deep else "plain-main")
        c = Ctx(root, meta, None, drop, timeout)
        try:
            return as_dict(w, w.fn(c))
        finally:
            rmtree(os.path.join(root, "bench-new"))
            if w.restore:
                w.restore(c, spec["pristine"])
    run = spec["run_dir"]
    mnt, upper, work = (os.path.join(run, n) for n in ("mnt", "upper", "work"))
    fresh_dir(upper)
    fresh_dir(work)
    os.makedirs(mnt, exist_ok=True)
    if w.deep:
        lowers, cwd = meta["deep_lowers"], meta["deep_dir"]
    else:
        lowers, cwd = meta["lowers"], None
    pid = None
    try:
        pid = do_mount(kind, spec["bins"].get(binkey), lowers, upper, work, mnt, cwd,
                       TARGET_OPTS.get(target, ""))
        c = Ctx(mnt, meta, pid, drop, timeout)
        return as_dict(w, w.fn(c))
    finally:
        do_unmount(mnt, pid)
        rmtree(upper)
        rmtree(work)


def as_dict(w, v):
    return v if isinstance(v, dict) else {w.name: v}


def inner_main(spec_json):
    """Child side of a rootless measurement (inside the user namespace)."""
    spec = json.loads(spec_json)

    def drop():
        os.sync()
        print("DROP", flush=True)
        if sys.stdin.readline().strip() != "OK":
            raise RuntimeError("parent did not drop caches")
    try:
        res = {"ok": measure(spec, drop)}
    except Skip:
        res = {"skip": True}
    except Exception as e:
        res = {"error": str(e)}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def measure_rootless(spec):
    p = subprocess.Popen([sys.executable, USERNS, sys.executable, os.path.abspath(__file__),
                          "--_inner", json.dumps(spec)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    result = None
    try:
        for line in p.stdout:
            line = line.strip()
            if line == "DROP":
                drop_caches()
                p.stdin.write("OK\n")
                p.stdin.flush()
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        err = p.stderr.read()
        p.wait()
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(timeout=60)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    if result is None:
        raise RuntimeError(f"rootless child exited {p.returncode}: {err.strip()[-400:]}")
    if "skip" in result:
        raise Skip()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["ok"]


# ---------------------------------------------------------------- reporting

def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def slowdown(v, ref, unit):
    """>1 means `v` is worse than `ref`: time/time, ref/v for throughput, v/ref for memory."""
    if v is None or ref is None or v <= 0 or ref <= 0:
        return None
    return ref / v if unit == "MiB/s" else v / ref


def summarize(results, metrics, targets):
    """{metric: {target: {median, min, max, n, errors}}}"""
    out = {}
    for m, unit in metrics:
        out[m] = {}
        for t in targets:
            r = results.get(m, {}).get(t)
            if not r:
                continue
            vals = r["values"]
            out[m][t] = {"median": statistics.median(vals) if vals else None,
                         "min": min(vals) if vals else None,
                         "max": max(vals) if vals else None,
                         "n": len(vals), "errors": r["errors"], "skipped": r.get("skipped")}
    return out


def ratio_cols(targets):
    cols = [(f"{t}/kernel", t, "kernel") for t in targets if t != "kernel" and
            "kernel" in targets]
    for s, suffix in (("strata", ""), ("strata-rootless", "-rootless")):
        if s in targets:
            for ref in ("fo1" + suffix, "fo2" + suffix):
                if ref in targets:
                    cols.append((f"{s}/{ref}", s, ref))
    return cols


def tables(summary, metrics, targets):
    """Two markdown tables (medians with ranges; ratios) as lists of lines."""
    hdr = "| workload | unit | " + " | ".join(targets) + " |"
    lines = [hdr, "|" + "---|" * (len(targets) + 2)]
    for m, unit in metrics:
        cells = []
        for t in targets:
            s = summary[m].get(t)
            if not s or s.get("skipped"):
                cells.append("n/a")
            elif s["median"] is None:
                cells.append("ERROR")
            else:
                c = f"{fmt(s['median'], unit)} ({fmt(s['min'], unit)}–{fmt(s['max'], unit)})"
                if s["errors"]:
                    c += f" [{len(s['errors'])} err]"
                cells.append(c)
        lines.append(f"| {m} | {unit} | " + " | ".join(cells) + " |")
    cols = ratio_cols(targets)
    rl = ["| workload | " + " | ".join(c[0] for c in cols) + " |",
          "|" + "---|" * (len(cols) + 1)]
    for m, unit in metrics:
        cells = []
        for _, a, b in cols:
            sa, sb = summary[m].get(a), summary[m].get(b)
            r = slowdown(sa and sa["median"], sb and sb["median"], unit)
            cells.append(f"{r:.2f}" if r is not None else "-")
        rl.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines, rl


def text_table(summary, metrics, targets):
    cols = ratio_cols(targets)
    w0 = max(len(m) for m, _ in metrics) + 2
    tw = [max(10, len(t)) + 2 for t in targets]
    cw = [len(c[0]) + 2 for c in cols]
    head = f"{'workload':<{w0}}{'unit':<7}" + "".join(f"{t:>{w}}" for t, w in zip(targets, tw)) \
        + "".join(f"{c[0]:>{w}}" for c, w in zip(cols, cw))
    out = [head, "-" * len(head)]
    for m, unit in metrics:
        row = f"{m:<{w0}}{unit:<7}"
        for t, w in zip(targets, tw):
            s = summary[m].get(t)
            v = "n/a" if not s or s.get("skipped") else (
                "ERR" if s["median"] is None else fmt(s["median"], unit) +
                ("*" if s["errors"] else ""))
            row += f"{v:>{w}}"
        for (_, a, b), w in zip(cols, cw):
            sa, sb = summary[m].get(a), summary[m].get(b)
            r = slowdown(sa and sa["median"], sb and sb["median"], unit)
            row += f"{(f'{r:.2f}' if r is not None else '-'):>{w}}"
        out.append(row)
    return out


COLORS = {"fo1": "#d62728", "fo2": "#ff7f0e", "strata": "#1f77b4",
          "strata-rootless": "#17becf", "fo1-rootless": "#9467bd", "fo2-rootless": "#e377c2",
          "plain": "#7f7f7f"}


def svg_chart(summary, metrics, targets, title):
    """Grouped bar chart (log scale) of the slowdown vs kernel overlayfs per workload."""
    bars = [t for t in targets if t != "kernel"]
    ms = [(m, u) for m, u in metrics if u != "MiB"]
    if "kernel" not in targets or not bars or not ms:
        return None
    import math
    vals = {}
    for m, u in ms:
        k = summary[m].get("kernel")
        for t in bars:
            s = summary[m].get(t)
            vals[(m, t)] = slowdown(s and s["median"], k and k["median"], u)
    finite = [v for v in vals.values() if v]
    lo = 10 ** math.floor(math.log10(min(finite + [0.5])))
    hi = 10 ** math.ceil(math.log10(max(finite + [2])))
    bw, gap, left, top, ph = 9, 14, 60, 40, 320
    gw = len(bars) * bw + gap
    width = left + gw * len(ms) + 20
    height = top + ph + 150

    def y(v):
        return top + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) -
                                                             math.log10(lo)) * ph
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{left}" y="20" font-size="14">{title}</text>']
    d = lo
    while d <= hi * 1.0001:
        for mult in (1, 2, 5):
            v = d * mult
            if lo <= v <= hi:
                o.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                         f'stroke="{"#444" if v == 1 else "#ddd"}"/>')
                o.append(f'<text x="{left - 5}" y="{y(v) + 4:.1f}" text-anchor="end">'
                         f'{v:g}</text>')
        d *= 10
    o.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" '
             f'text-anchor="middle">slowdown vs kernel overlayfs (log; &gt;1 = slower)</text>')
    for i, (m, _) in enumerate(ms):
        x0 = left + i * gw + gap / 2
        for j, t in enumerate(bars):
            v = vals[(m, t)]
            if not v:
                continue
            yv, y1 = y(v), y(1)
            o.append(f'<rect x="{x0 + j * bw:.1f}" y="{min(yv, y1):.1f}" width="{bw - 1}" '
                     f'height="{abs(y1 - yv):.1f}" fill="{COLORS.get(t, "#000")}">'
                     f'<title>{m} {t}: {v:.2f}</title></rect>')
        cx = x0 + len(bars) * bw / 2
        o.append(f'<text x="{cx:.1f}" y="{top + ph + 8}" text-anchor="end" '
                 f'transform="rotate(-55 {cx:.1f} {top + ph + 8})">{m}</text>')
    for j, t in enumerate(bars):
        o.append(f'<rect x="{left + j * 120}" y="{height - 18}" width="10" height="10" '
                 f'fill="{COLORS.get(t, "#000")}"/><text x="{left + j * 120 + 14}" '
                 f'y="{height - 9}">{t}</text>')
    o.append("</svg>")
    return "\n".join(o)


def version_of(binary):
    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        lines = (r.stdout + r.stderr).strip().splitlines() or ["?"]
        # fuse-overlayfs 1.10 prints fusermount3's version first.
        return next((ln for ln in lines if "overlayfs" in ln or "stratafs" in ln), lines[0])
    except Exception as e:
        return f"unknown ({e})"


def machine_facts(bench_dir):
    def cmd(c):
        try:
            return subprocess.run(c, capture_output=True, text=True, shell=True).stdout.strip()
        except Exception:
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {"hostname": socket.gethostname(), "kernel": os.uname().release,
            "cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(int(mem) / 1024 / 1024, 1),
            "bench_fs": cmd(f"findmnt -no FSTYPE,SOURCE,OPTIONS -T {bench_dir}"),
            "fio": cmd("fio --version"), "python": sys.version.split()[0],
            "reclaim": proactive_reclaim()}


def proactive_reclaim():
    """DAMON schemes running on the machine, e.g. `pageout` of pages unused for a minute: they
    evict page cache (FUSE's cached directory listings too) in the middle of a run, so a
    "warm" walk may have to read some directories again. Recorded with the results."""
    root = "/sys/kernel/mm/damon/admin/kdamonds"
    found = []
    try:
        for k in sorted(os.listdir(root)):
            kd = os.path.join(root, k)
            if not k.isdigit() or read_text(os.path.join(kd, "state")) != "on":
                continue
            ctx = os.path.join(kd, "contexts")
            for c in sorted(x for x in os.listdir(ctx) if x.isdigit()):
                sch = os.path.join(ctx, c, "schemes")
                for n in sorted(x for x in os.listdir(sch) if x.isdigit()):
                    found.append(read_text(os.path.join(sch, n, "action")))
    except OSError:
        pass
    return f"DAMON {', '.join(found)}" if found else "none"


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def wait_for_quiet(threshold, max_wait):
    t0 = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        if load <= threshold:
            return load, round(time.monotonic() - t0)
        if time.monotonic() - t0 > max_wait:
            log(f"load {load:.2f} still > {threshold} after {max_wait} s, running anyway")
            return load, round(time.monotonic() - t0)
        log(f"load {load:.2f} > {threshold}, waiting")
        time.sleep(30)


# ---------------------------------------------------------------- main

def select_workloads(spec):
    if not spec:
        return list(WORKLOADS)
    out = []
    for item in spec.split(","):
        item = item.strip()
        for w in WORKLOADS:
            if (item == w.name or item == w.group or item in w.name) and w not in out:
                out.append(w)
        if not any(item == w.name or item == w.group or item in w.name for w in WORKLOADS):
            sys.exit(f"no workload matches {item!r} (see --list)")
    return [w for w in WORKLOADS if w in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", help="comma list of " + ",".join(TARGETS) +
                    " (default: every available one of " + ",".join(DEFAULT_TARGETS) + ")")
    ap.add_argument("--workloads", help="comma list of names, groups or substrings")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", choices=list(SIZES), default="standard",
                    help="fixture: standard (/usr/share, 1 GiB file; default), large (/usr), "
                    "small (smoke test)")
    ap.add_argument("--small", action="store_true", help="same as --size small")
    ap.add_argument("--image", default=IMAGE,
                    help=f"ext4 image file holding the fixtures and mounts (default {IMAGE}); "
                    "'none' uses the filesystem of " + BENCH_ROOT + " as it is")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the fixture")
    ap.add_argument("--stratafs", default=DEFAULT_STRATA, help="stratafs binary to run")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="one more target: any binary with the fuse-overlayfs command line "
                         "(another stratafs build, a fuse-overlayfs version); a NAME ending "
                         "in -rootless runs it in a user namespace; may repeat")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="wait (up to --max-wait s) while the 1-min load is above this")
    ap.add_argument("--max-wait", type=int, default=600)
    ap.add_argument("--list", action="store_true", help="list workloads and targets")
    ap.add_argument("--_inner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._inner:
        return inner_main(args._inner)
    if args.list:
        for w in WORKLOADS:
            print(f"{w.name:<18} {w.group:<10} {w.unit:<6} {w.doc.splitlines()[0]}")
        print("targets:", ", ".join(TARGETS))
        return 0
    if os.geteuid() != 0:
        sys.exit("run as root")

    bins = {"strata": os.path.abspath(args.stratafs), "fo1": FO1, "fo2": FO2}
    extras = []
    for e in args.extra:
        name, sep, path = e.partition("=")
        if not sep or not name or not path or name in TARGETS or "/" in name:
            sys.exit(f"--extra {e!r}: want NAME=PATH with a new target name")
        TARGETS[name] = ("fuse", name, name.endswith("-rootless"))
        bins[name] = os.path.abspath(path)
        extras.append(name)
    notes = []
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        for t in targets:
            if t not in TARGETS:
                sys.exit(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    else:
        targets = list(DEFAULT_TARGETS)
    targets += [e for e in extras if e not in targets]
    avail = []
    for t in targets:
        kind, bk, rootless = TARGETS[t]
        if bk and not os.access(bins[bk], os.X_OK):
            notes.append(f"target {t} skipped: {bins[bk]} not found")
            continue
        if kind == "fuse" and not os.path.exists("/dev/fuse"):
            notes.append(f"target {t} skipped: no /dev/fuse")
            continue
        avail.append(t)
    targets = avail
    for n in notes:
        log("note: " + n)
    workloads = select_workloads(args.workloads)
    metrics = [m for w in workloads for m in w.metrics]

    enter_private_mount_namespace()
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    mode = "small" if args.small else args.size
    if args.image != "none":
        mount_image(args.image)
    fx = os.path.join(BENCH_ROOT, f"fixtures-{mode}")
    run_dir = os.path.join(BENCH_ROOT, "run")
    os.makedirs(run_dir, exist_ok=True)
    t_start = time.monotonic()
    started = datetime.datetime.now()
    meta = build_fixtures(fx, mode, args.rebuild)
    fixture_seconds = round(time.monotonic() - t_start, 1)

    load0, waited = wait_for_quiet(args.max_load, args.max_wait)
    facts = machine_facts(BENCH_ROOT)
    versions = {"kernel": "overlay, Linux " + facts["kernel"]}
    for t in targets:
        bk = TARGETS[t][1]
        if bk:
            versions[t] = version_of(bins[bk]) + f" ({bins[bk]})"
    pristine = os.path.join(run_dir, "pristine")
    results = {m: {t: {"values": [], "errors": []} for t in targets} for m, _ in metrics}
    log_lines = []
    interrupted = False
    uring_was = None
    if any(t in TARGET_OPTS for t in targets):
        uring_was = set_enable_uring("Y")
    try:
        if "plain" in targets:
            os.makedirs(pristine, exist_ok=True)
            if not is_mounted(pristine):
                subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                "ro,lowerdir=" + ":".join(meta["lowers"]), pristine],
                               check=True)
            c = Ctx(os.path.join(fx, "plain-main"), meta, None, None, None)
            rmtree(os.path.join(c.root, "bench-new"))
            for f in (restore_rm, restore_big, restore_mv):
                f(c, pristine)
        for w in workloads:
            for rep in range(args.reps):
                for t in targets:
                    spec = {"target": t, "workload": w.name, "fx": fx, "run_dir": run_dir,
                            "bins": bins, "pristine": pristine, "tdef": TARGETS[t]}
                    t0 = time.monotonic()
                    try:
                        if TARGETS[t][2]:
                            vals = measure_rootless(spec)
                        else:
                            vals = measure(spec, drop_caches)
                        for m, v in vals.items():
                            results[m][t]["values"].append(v)
                        msg = " ".join(f"{m}={fmt(v, dict(metrics)[m])}" for m, v in
                                       vals.items())
                    except Skip:
                        for m, _ in w.metrics:
                            results[m][t]["skipped"] = True
                        msg = "n/a"
                    except Exception as e:
                        for m, _ in w.metrics:
                            results[m][t]["errors"].append(f"rep {rep + 1}: {e}")
                        msg = f"ERROR {e}"
                    line = (f"[{time.monotonic() - t_start:7.0f}s] {w.name:<17} rep {rep + 1} "
                            f"{t:<16} {msg}  ({time.monotonic() - t0:.1f} s)")
                    log(line)
                    log_lines.append(line)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up and writing partial results")
    finally:
        for m in sorted((p for p in mountpoints() if p.startswith(run_dir + "/")), key=len,
                        reverse=True):
            do_unmount(m, find_daemon(m))
        for n in ("upper", "work"):
            rmtree(os.path.join(run_dir, n))
        if uring_was is not None:
            set_enable_uring(uring_was)

    total = round(time.monotonic() - t_start, 1)
    summary = summarize(results, metrics, targets)
    med, rat = tables(summary, metrics, targets)
    txt = text_table(summary, metrics, targets)
    print("\n".join(txt))
    errors = [f"{m} / {t}: {e}" for m, _ in metrics for t in targets
              for e in results[m][t]["errors"]]
    if errors:
        print("\nerrors:")
        print("\n".join("  " + e for e in errors))

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{started:%Y-%m-%d}-{facts['hostname']}" +
                        ("" if mode == "standard" else f"-{mode}"))
    cmdline = "python3 " + shlex.join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    md = [f"# stratafs benchmark, {started:%Y-%m-%d %H:%M}" +
          (" (INTERRUPTED, partial)" if interrupted else ""), "",
          f"Command: `{cmdline}` (in {REPO})", "",
          f"Fixture: {mode} ({meta['merged_entries']} merged entries; bottom layer = copy of "
          f"{meta['sizes']['source']} + {meta['big_size'] // MIB} MiB file + "
          f"{meta['sizes']['dir_entries']}-entry dir; L2 = {meta['whiteouts']} whiteouts "
          f"(incl. dir {meta['whiteout_dir']}) + {meta['overrides']} overrides; L1 = "
          f"{meta['sizes']['l1_files'] + 20} added files; deep stack "
          f"{meta['sizes']['deep_layers']} layers). Reps: {args.reps}, targets interleaved, "
          f"fresh mount and empty upper per measurement.", "",
          "## Machine", "",
          f"- kernel: `{facts['kernel']}`",
          f"- CPU: {facts['cpu']} × {facts['cpus']}",
          f"- memory: {facts['mem_gib']} GiB",
          f"- proactive reclaim: {facts.get('reclaim', '?')}",
          f"- bench dir fs: `{facts['bench_fs']}` ({BENCH_ROOT})",
          f"- fio: {facts['fio']}, Python {facts['python']}",
          f"- load average at start: {load0:.2f} (waited {waited} s for it)"
          f"; at end: {os.getloadavg()[0]:.2f}",
          "", "## Targets", ""]
    md += [f"- {t}: {versions.get(t, 'plain directory (copy of the merged tree)')}"
           for t in targets]
    md += [f"- {n}" for n in notes]
    md += ["", f"Runtime: {total} s total ({fixture_seconds} s fixture check/build).", "",
           "## Results (median (min–max))", "",
           "Units: s = wall seconds (lower is better); MiB/s = throughput (higher is "
           "better); MiB = daemon peak RSS (lower is better).", ""] + med + \
        ["", "## Ratios", "",
         "Slowdown factors of the medians, >1 = the first target is worse: for times "
         "a/b, for throughput b/a (so also >1 = slower), for RSS a/b (>1 = more memory).",
         ""] + rat
    if errors:
        md += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    svg = svg_chart(summary, metrics, targets,
                    f"stratafs bench {started:%Y-%m-%d} {facts['hostname']} ({mode})")
    if svg:
        with open(base + ".svg", "w") as f:
            f.write(svg)
        # A PNG of the same chart where librsvg's converter is installed (librsvg2-bin).
        if shutil.which("rsvg-convert"):
            subprocess.run(["rsvg-convert", "-o", base + ".png", base + ".svg"], check=False)
        md += ["", f"![slowdown vs kernel]({os.path.basename(base)}.svg)",
               "(SVG drawn by run.py: matplotlib is not installed; log scale, >1 = slower "
               "than kernel overlayfs.)"]
    md += ["", "## Workloads", ""] + [f"- **{w.name}** ({w.group}): {w.doc}" for w in
                                      workloads]
    md += ["", "## Log", "", "```"] + log_lines + ["```", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md))
    with open(base + ".json", "w") as f:
        json.dump({"command": cmdline, "started": started.isoformat(timespec="seconds"),
                   "interrupted": interrupted, "total_seconds": total,
                   "fixture_seconds": fixture_seconds, "machine": facts,
                   "load_start": load0, "versions": versions, "notes": notes,
                   "targets": targets, "reps": args.reps,
                   "metrics": [{"name": m, "unit": u} for m, u in metrics],
                   "fixture": {k: v for k, v in meta.items() if k != "sizes"} |
                   {"sizes": meta["sizes"]},
                   "summary": summary, "results": results}, f, indent=1)
    log(f"wrote {base}.md, .json" + (", .svg" if svg else "") + f"; total {total} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
