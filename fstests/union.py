"""A union mount on any of the three targets (stratafs, kernel overlayfs, fuse-overlayfs) with
many lower layers, and the means to get out of a hung one, shared by the concurrency and
limits suites.

Why a module of its own: tools/harden's Mount has one lower layer and no way out of a hang;
these suites need hundreds of layers, a remount on the same upper, and a rescue that never
blocks: a request that does not come back in time gets its stacks dumped, the FUSE connection
aborted, the mount detached and the daemon killed, so that a hang is a failed case and never a
stuck test run. Also `in_child`, a forked child with a time limit, so that a check walking a
possibly hung mount cannot hang its caller.
"""

import glob
import json
import os
import select
import signal
import subprocess
import time

TARGETS = ["stratafs", "kernel", "fuse-overlayfs"]
DEFAULT_BINARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "target/release/stratafs")


def errname(e):
    """The symbolic errno of an OSError (or its text)."""
    import errno
    return errno.errorcode.get(getattr(e, "errno", None) or 0, str(e))


def enter_private_mount_namespace():
    """A mount namespace of our own: nothing mounted here is seen outside, or survives us."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000,
                                                   None) != 0:
        raise SystemExit("cannot make a private mount namespace")


def mount_source(merged):
    """(major:minor, fstype) of the mount at `merged`, or None."""
    real = os.path.realpath(merged)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == real:
                found = (fields[2], fields[fields.index("-") + 1])
    return found


class Union:
    """lowers (top first), upper, work, merged: paths. `rel_lowers` passes the lower layers to
    kernel overlayfs relative to `cwd` (a page holds the options of at most ~4000 bytes)."""

    def __init__(self, target, binary, lowers, upper, work, merged, cwd=None, rel_lowers=None):
        self.target, self.binary = target, binary
        self.lowers, self.upper, self.work, self.merged = lowers, upper, work, merged
        self.cwd, self.rel_lowers = cwd, rel_lowers
        self.daemon = None

    def opts(self, lowers):
        return f"lowerdir={':'.join(lowers)},upperdir={self.upper},workdir={self.work}"

    def mount(self):
        """Mounts; raises RuntimeError with the error output when the target refuses."""
        if self.target == "kernel":
            cmd = ["mount", "-t", "overlay", "overlay", "-o",
                   self.opts(self.rel_lowers or self.lowers), self.merged]
        elif self.target == "fuse-overlayfs":
            cmd = ["fuse-overlayfs", "-o", self.opts(self.lowers), self.merged]
        else:
            cmd = [self.binary, "-o", self.opts(self.lowers), self.merged]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           cwd=self.cwd if self.target == "kernel" else None)
        if r.returncode != 0 or not mount_source(self.merged):
            self.umount()
            text = (r.stdout + r.stderr).strip().splitlines() or ["no output"]
            raise RuntimeError(f"exit {r.returncode}: {text[0][-200:]}")
        self.daemon = self.find_daemon()
        return self

    def find_daemon(self):
        """The pid of the FUSE daemon serving this mount (its argv names the mount point)."""
        if self.target == "kernel":
            return None
        want = os.fsencode(self.merged)
        for p in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(p, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            names = (b"fuse-overlayfs", b"stratafs", os.path.basename(os.fsencode(self.binary)))
            if want in argv and argv[0] and os.path.basename(argv[0]) in names:
                return int(p.split("/")[2])
        return None

    def umount(self):
        """Unmounts (lazily as a last resort) and waits up to 10 s for the daemon to exit."""
        for cmd in (["umount", self.merged], ["umount", "-l", self.merged]):
            if not mount_source(self.merged):
                break
            try:
                subprocess.run(cmd, capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.daemon:
            end = time.time() + 10
            while time.time() < end and os.path.exists(f"/proc/{self.daemon}"):
                if _zombie_or_gone(self.daemon):
                    break
                time.sleep(0.05)
            if os.path.exists(f"/proc/{self.daemon}") and not _zombie_or_gone(self.daemon):
                os.kill(self.daemon, signal.SIGKILL)
            self.daemon = None

    def remount(self):
        self.umount()
        return self.mount()

    def rescue(self, stuck_pids=()):
        """For a hung mount: returns the kernel stacks of the stuck callers and of the daemon's
        threads, then aborts the FUSE connection, detaches the mount and kills the daemon."""
        dump = []
        for pid in list(stuck_pids) + ([self.daemon] if self.daemon else []):
            for task in sorted(glob.glob(f"/proc/{pid}/task/*")):
                try:
                    with open(f"{task}/stack") as f:
                        stack = " < ".join(ln.split()[1].split("+")[0]
                                           for ln in f.read().splitlines() if " " in ln)
                    with open(f"{task}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                dump.append(f"{task[6:]} {comm}: {stack}")
        src = mount_source(self.merged)
        if src and src[1].startswith("fuse"):
            conns = "/sys/fs/fuse/connections"
            if not os.listdir(conns):
                subprocess.run(["mount", "-t", "fusectl", "none", conns], capture_output=True)
            try:
                with open(f"{conns}/{src[0].split(':')[1]}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
        subprocess.run(["umount", "-l", self.merged], capture_output=True, timeout=30)
        if self.daemon:
            try:
                os.kill(self.daemon, signal.SIGKILL)
            except OSError:
                pass
            self.daemon = None
        return dump


def unmount_all_under(top):
    """Detaches every mount below `top` (a case's leftovers), deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [ln.split(" ")[4] for ln in f]
    for m in sorted((p for p in points if p.startswith(top + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)


def _zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def in_child(fn, timeout, union=None):
    """Runs fn() -> JSON-able value in a forked child; returns (ok, value or reason). On a
    timeout the child is killed and, with `union`, the mount rescued (stacks in the reason)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            out = json.dumps([True, fn()])
        except Exception as e:  # noqa: BLE001 - reported as the case's failure
            out = json.dumps([False, f"{type(e).__name__}: {e}"])
        data = out.encode()
        while data:
            data = data[os.write(wfd, data):]
        os._exit(0)
    os.close(wfd)
    chunks, end = [], time.time() + timeout
    while True:
        left = end - time.time()
        ready = select.select([rfd], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            break
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    if time.time() >= end:
        dump = union.rescue([pid]) if union else []
        os.kill(pid, signal.SIGKILL)
        reap(pid, 10)
        return False, f"hung for {timeout} s; stacks: {' | '.join(dump)[:1500]}"
    reap(pid, 10)
    try:
        ok, value = json.loads(b"".join(chunks).decode())
    except ValueError:
        return False, "the child died without a result"
    return ok, value


def reap(pid, seconds):
    """waitpid with a limit (a child stuck in the kernel may not die at once)."""
    end = time.time() + seconds
    while time.time() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.05)
    return False


def run_and_count(targets, cases_of):
    """Runs `cases_of(target)` (yielding (ok, what)) for every target, prints one PASS or FAIL
    line per case and ends with "N passed, M failed" for stratafs, the line tools/harden reads.
    Returns the exit status."""
    passed = failed = 0
    for target in targets:
        for ok, what in cases_of(target):
            print(f"{'PASS' if ok else 'FAIL'} {target}: {what}", flush=True)
            if target == "stratafs":
                passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
