#!/usr/bin/env python3
"""Crash safety: SIGKILL the stratafs daemon at a random moment of a workload made of every
kind of write a container does, again and again; remount and check the merged tree against
what the operations that returned before the kill promise.

The workload (fstests/crashops.py) creates (O_EXCL, write, fsync), writes in place and
overwrites copied-up and upper files, truncates (grow, shrink), fallocates (extend, keep
size, punch holes), unlinks lower and upper files (whiteouts), makes and removes directories
(a lower one removed leaves a whiteout, recreated it must be opaque), renames files over
files, to new names, lower directories, with RENAME_EXCHANGE and RENAME_NOREPLACE, hard links
lower files (copy-up and link), makes symlinks and fifos, sets and removes user.* xattrs,
chmods, chowns and utimes lower files (metadata copy-ups), and fsyncs, fdatasyncs, syncfs.
Every operation is journaled outside the mount before it starts and after it returned; the
first operations copy up 32 MiB lower files, so that early kills land in data copy-ups.

After each kill and remount (fstests/crashmodel.py has the model and the rules):
  1. the merged tree is, as a whole, the state after the last operation that returned or
     the state after the one in flight at the kill (a rename replaces its destination
     atomically: the old or the new content, never nothing), with file data allowed to be
     any content it had since its last fsync/fdatasync/syncfs, and nothing else: no half
     copy (every 4 KiB block says whose block it is and which write made it), no lost lower
     file, no lower directory's entries showing through a recreated directory, hard links
     sharing an inode, modes, owners, user.* xattrs, mtimes set by utimes and kept by copy-up;
  2. operations meant to fail (RENAME_NOREPLACE or O_EXCL onto an existing name, rmdir of a
     non-empty directory) failed with their errno and changed nothing, and no operation
     failed while the daemon was alive;
  3. the remounted daemon emptied the workdir, and the upper layer holds no temporary: every
     entry of it is a whiteout or shows in the merged tree;
  4. the whole merged tree can be walked and read (within a timeout: a hang is a failure);
  5. the lower layer is unchanged (its inodes' ctimes each iteration, its bytes at the end).
Every fourth iteration also kills the remounting daemon during its own workdir cleanup (a
large leftover tree is planted there first), then mounts again: the cleanup must resume.

Why: copy-up, whiteouts and renames go through the workdir so that a killed daemon leaves
the old or the new state, never a half one, and the next mount cleans up. Only killing it
tells. A failure names the iteration, the operation in flight, each path that is wrong, what
was seen and what was acceptable, and the last operations on that path; the journal, the
daemon's log and a listing of the upper layer are kept in /var/tmp/crashloop-failures/ (and
the upper layer and workdir themselves, for the first two failures of a run).

Usage: python3 fstests/crashloop.py [--binary PATH] [--iterations N] [--seed S]
Ends with the line "N passed, M failed" (one per iteration).
"""

import argparse
import collections
import hashlib
import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import crashmodel as cm  # noqa: E402
from crashops import Workload  # noqa: E402

BIG_BLOCKS = 8192  # 32 MiB per large lower file
FAILURES = "/var/tmp/crashloop-failures"
JUNK_FILES = 3000
KEEP_LAYERS = 2  # failures whose upper and workdir are kept whole
RUNNING = {"daemons": [], "children": set(), "kept": 0}  # killed on the way out, whatever happens


# ---------------------------------------------------------------- mounts that cannot hang us

def mount(binary, top, fresh_log=False):
    opts = f"lowerdir={top}/l,upperdir={top}/u,workdir={top}/w"
    # The daemon's log goes to a file: a pipe nobody reads would block it once full.
    with open(f"{top}/daemon.log", "wb" if fresh_log else "ab") as log:
        daemon = subprocess.Popen([binary, "-f", "-o", opts, f"{top}/m"],
                                  stdout=subprocess.DEVNULL, stderr=log)
    RUNNING["daemons"] = [d for d in RUNNING["daemons"] if d.poll() is None] + [daemon]
    return daemon


def daemon_log(top):
    with open(f"{top}/daemon.log", "rb") as f:
        return f.read().decode(errors="replace")


def wait_mounted(top, daemon, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if common.is_mounted(f"{top}/m"):
            return True
        if daemon.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def abort_fuse(mnt):
    """Aborts the FUSE connection of `mnt` (what is blocked on it gets ENOTCONN)."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == real and fields[2].startswith("0:"):
                try:
                    with open(f"/sys/fs/fuse/connections/{fields[2][2:]}/abort", "w") as a:
                        a.write("1")
                except OSError:
                    pass


def unmount(mnt, lazy=False):
    """Unmounts `mnt` without ever blocking for long: umount, then abort and lazy umount."""
    for cmd in ([] if lazy else [["umount", mnt]]) + [["umount", "-l", mnt]]:
        if not common.is_mounted(mnt):
            return
        try:
            subprocess.run(cmd, stderr=subprocess.DEVNULL, timeout=20)
        except subprocess.TimeoutExpired:
            abort_fuse(mnt)
    if common.is_mounted(mnt):
        abort_fuse(mnt)
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL, timeout=20)


def stop(daemon):
    """SIGKILLs a daemon we started (by its pid) and reaps it."""
    if daemon.poll() is None:
        daemon.kill()
    daemon.wait()


def in_child(fn, out, timeout):
    """fn() in a forked child, its result through the file `out`; ("hang", None) when it
    takes longer than `timeout` seconds (the child is then killed)."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            res = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - reported as the check's failure
            res = ("error", f"{type(e).__name__}: {e}")
        with open(out, "wb") as f:
            pickle.dump(res, f)
        os._exit(0)
    RUNNING["children"].add(pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            RUNNING["children"].discard(pid)
            with open(out, "rb") as f:
                return pickle.load(f)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    RUNNING["children"].discard(pid)
    return "hang", None


# ---------------------------------------------------------------- layers

def lower_state(root, contents):
    """path -> inode, type, mode, owner, size, mtime, ctime, xattrs (and a content hash)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [""] + dirnames + filenames:
            p = os.path.join(dirpath, n) if n else dirpath
            st = os.lstat(p)
            x = {a: os.getxattr(p, a, follow_symlinks=False)
                 for a in os.listxattr(p, follow_symlinks=False)}
            desc = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                    st.st_ctime_ns, st.st_nlink, sorted(x.items()))
            if contents and stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    desc += (hashlib.sha256(f.read()).hexdigest(),)
            out[os.path.relpath(p, root)] = desc
    return out


def lower_changes(before, after):
    return [f"the lower layer changed: {p}" for p in sorted(set(before) | set(after))
            if before.get(p) != after.get(p)][:5]


def is_whiteout(path, st):
    """A whiteout: the kernel's 0/0 device, an xattr-marked empty file, a .wh. file."""
    if os.path.basename(path).startswith(".wh.") or stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        names = os.listxattr(path, follow_symlinks=False)
        return any(n.endswith("overlay.whiteout") for n in names)
    return False


def check_layers(top, obs, problems):
    """The workdir emptied by the mount; every upper entry a whiteout or in the merged tree."""
    work = f"{top}/w/work"
    if os.path.isdir(work) and os.listdir(work):
        problems.append(f"workdir not cleaned: {sorted(os.listdir(work))[:5]}")
    for dirpath, dirnames, filenames in os.walk(f"{top}/u"):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, f"{top}/u")
            if n.startswith("#"):
                problems.append(f"temporary in the upper layer: {rel}")
            elif rel not in obs and not is_whiteout(p, os.lstat(p)):
                problems.append(f"stray entry in the upper layer (not in the merged tree): {rel}")


def upper_listing(root):
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            x = {a: os.getxattr(p, a, follow_symlinks=False)
                 for a in os.listxattr(p, follow_symlinks=False)}
            lines.append(f"{os.path.relpath(p, root)} {stat.filemode(st.st_mode)} "
                         f"size={st.st_size} nlink={st.st_nlink} ino={st.st_ino} {x}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the workdir cleanup kill

def plant_junk(work, tag):
    """What a killed daemon can leave in the workdir, in quantity: a removed directory full
    of whiteouts (links of one whiteout device) and files, a deep chain, an unreadable
    directory, a half copied large file. Returns how many entries were planted."""
    top = f"{work}/#junk{tag}"
    os.makedirs(f"{top}/wh")
    os.mknod(f"{top}/wh/#w", 0o600 | stat.S_IFCHR, 0)
    for i in range(JUNK_FILES // 2):
        os.link(f"{top}/wh/#w", f"{top}/wh/w{i}")
    for d in range(10):
        os.makedirs(f"{top}/files/d{d}")
        for i in range(JUNK_FILES // 20):
            with open(f"{top}/files/d{d}/f{i}", "wb") as f:
                f.write(b"x" * 100)
    deep = top + "/deep" * 40
    os.makedirs(deep)
    with open(f"{deep}/leaf", "wb") as f:
        f.write(b"leaf")
    os.makedirs(f"{top}/locked/sub")
    os.chmod(f"{top}/locked", 0)
    with open(f"{work}/#half{tag}", "wb") as f:
        f.write(b"\xab" * (8 << 20))
    return count_entries(work)


def count_entries(root):
    return sum(len(d) + len(f) for _, d, f in os.walk(root))


def calibrate(binary, top):
    """How long a mount takes to clean up a planted leftover tree (the median of three)."""
    times = []
    for _ in range(3):
        reset_layers(top)
        os.makedirs(f"{top}/w/work")
        plant_junk(f"{top}/w/work", "cal")
        started = time.time()
        daemon = mount(binary, top, fresh_log=True)
        ok = wait_mounted(top, daemon)
        times.append(time.time() - started if ok else 0.5)
        unmount(f"{top}/m")
        stop(daemon)
    return sorted(times)[1]


def kill_in_cleanup(binary, top, rnd, calib):
    """Plants a leftover tree, starts a mount and SIGKILLs it during its workdir cleanup."""
    work = f"{top}/w/work"
    os.makedirs(work, exist_ok=True)
    planted = plant_junk(work, rnd.randrange(1 << 20))
    delay = rnd.uniform(0, calib * 1.1)
    daemon = mount(binary, top)
    time.sleep(delay)
    stop(daemon)
    mounted = common.is_mounted(f"{top}/m")
    unmount(f"{top}/m", lazy=True)
    left = count_entries(work)
    where = "after" if mounted or not left else "before" if left == planted else "during"
    state = "mounted already" if mounted else f"{left} of {planted} workdir entries left"
    return where, f"remount killed after {delay:.3f} s ({state})"


# ---------------------------------------------------------------- one iteration

def reset_layers(top):
    for d in ("u", "w"):
        shutil.rmtree(f"{top}/{d}", ignore_errors=True)
        os.makedirs(f"{top}/{d}")
    for f in ("journal",):
        if os.path.exists(f"{top}/{f}"):
            os.unlink(f"{top}/{f}")


def run_workload(top, initial, seed, delay, daemon):
    """Forks the workload, SIGKILLs the daemon after `delay` seconds, then the workload."""
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            Workload(f"{top}/m", initial.copy(), random.Random(seed), f"{top}/journal") \
                .run_forever()
        finally:
            os._exit(0)
    RUNNING["children"].add(child)
    time.sleep(delay)
    stop(daemon)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    RUNNING["children"].discard(child)
    unmount(f"{top}/m", lazy=True)


def unfinished(top):
    """Entries the killed daemon left in the workdir (not the whiteout device it keeps)."""
    work = f"{top}/w/work"
    if not os.path.isdir(work):
        return 0
    return sum(1 for e in os.scandir(work)
               if not stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode))


def compare(initial, entries, obs):
    """(problems, in-flight op, older-unsynced count) of the observed tree against the
    journal."""
    alts, inflight, problems, touched = cm.replay(initial, entries)
    results = [cm.mismatches(a, obs) for a in alts]
    for diff, older in results:
        if not diff:
            return problems, inflight, older
    which = min(range(len(alts)), key=lambda i: len(results[i][0]))
    diff = results[which][0]
    problems.append(f"the merged tree is neither the state before nor after the operation "
                    f"in flight ({cm.describe_op(inflight) if inflight else 'none'}); "
                    f"{len(diff)} paths differ from the closest:")
    for path, why in list(diff.items())[:8]:
        problems.append(f"  {path or '/'}: {why}; seen: {cm.show_obs(obs.get(path))}")
        for label, a in zip(("before", "after"), alts):
            problems.append(f"      acceptable {label}: {cm.show_obj(a, path)}")
        fids = {a.paths[path] for a in alts if path in a.paths}
        for line in cm.ops_touching(entries, path, touched, fids):
            problems.append(f"      op {line}")
    return problems, inflight, 0


def check(top, initial, problems):
    """The checks of the remounted tree; returns (in-flight op, older count, ops)."""
    res, obs = in_child(lambda: cm.observe(f"{top}/m"), f"{top}/observed", 180)
    if res == "hang":
        problems.append("walking the remounted tree hung for 180 s")
        return None, 0, 0
    if res == "error":
        problems.append(f"walking the remounted tree: {obs}")
        return None, 0, 0
    check_layers(top, obs, problems)
    entries = cm.read_journal(f"{top}/journal")
    found, inflight, older = compare(initial, entries, obs)
    problems += found
    return inflight, older, len(entries)


def iteration(ctx, rnd, it):
    """One kill on a fresh upper layer (so that the large files are copied up again): mount,
    run the workload, kill at a random moment, (kill a remount in its cleanup,) remount,
    check. Returns (description, problems, in-flight op)."""
    top, binary = ctx["top"], ctx["binary"]
    reset_layers(top)
    daemon = mount(binary, top, fresh_log=True)
    if not wait_mounted(top, daemon):
        stop(daemon)
        return "mount", [f"mount failed: {daemon_log(top)[-2000:]}"], None
    # A quarter of the kills early, among the copy-ups of the large files.
    delay = rnd.uniform(0.003, 0.15) if rnd.random() < 0.25 else rnd.uniform(0.15, 2.0)
    run_workload(top, ctx["initial"], rnd.randrange(1 << 30), delay, daemon)
    what = [f"kill after {delay:.3f} s", f"{unfinished(top)} unfinished in the workdir"]
    if it % 4 == 0:
        where, text = kill_in_cleanup(binary, top, rnd, ctx["calib"])
        ctx["cleanup"][where] += 1
        what.append(text)
    daemon = mount(binary, top)
    problems, inflight, older, ops = [], None, 0, 0
    if not wait_mounted(top, daemon):
        stop(daemon)
        return ", ".join(what), [f"remount failed: {daemon_log(top)[-2000:]}"], None
    try:
        inflight, older, ops = check(top, ctx["initial"], problems)
    finally:
        unmount(f"{top}/m")
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(daemon)
            problems.append("the daemon was still running 30 s after its unmount")
    problems += lower_changes(ctx["lower"], lower_state(f"{top}/l", False))
    if "panicked" in daemon_log(top):
        problems.append(f"the daemon panicked: {daemon_log(top)[-2000:]}")
    what.insert(1, f"{ops} ops, in flight: {cm.describe_op(inflight) if inflight else 'none'}")
    if older:
        what.append(f"note: {older} files show an older unsynced content")
    if problems:
        keep_evidence(top, it)
    return ", ".join(what), problems, inflight


def keep_evidence(top, it):
    dest = f"{FAILURES}/{time.strftime('%Y%m%d-%H%M%S')}-iteration{it}"
    os.makedirs(dest, exist_ok=True)
    for f in ("journal", "daemon.log"):
        if os.path.exists(f"{top}/{f}"):
            shutil.copy(f"{top}/{f}", dest)
    with open(f"{dest}/upper.txt", "w") as f:
        f.write(upper_listing(f"{top}/u"))
    with open(f"{dest}/workdir.txt", "w") as f:
        f.write(upper_listing(f"{top}/w"))
    if RUNNING["kept"] < KEEP_LAYERS:  # whole, with xattrs (the lower is lower_spec's)
        RUNNING["kept"] += 1
        for d in ("u", "w"):
            subprocess.run(["cp", "-a", "--sparse=always", f"{top}/{d}", dest])
    print(f"  evidence kept in {dest}")


def kill_leftovers():
    """Our workload and check children and daemons, by pid, if an error or a signal cut an
    iteration short."""
    for pid in list(RUNNING["children"]):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    for daemon in RUNNING["daemons"]:
        stop(daemon)


# ---------------------------------------------------------------- the loop

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not common.can_run(args.binary):
        print("crash loop needs root, /dev/fuse and the stratafs binary")
        print(f"0 passed, {args.iterations} failed")
        return 1
    common.enter_private_mount_namespace()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("crash loop: terminated"))
    if not os.listdir("/sys/fs/fuse/connections"):  # to abort a hung connection
        subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                       stderr=subprocess.DEVNULL)
    rnd = random.Random(args.seed)
    top = tempfile.mkdtemp(prefix="crashloop-", dir="/var/tmp")
    passed = failed = 0
    kinds, cleanup = collections.Counter(), collections.Counter()
    started = time.time()
    try:
        for d in ("l", "u", "w", "m"):
            os.makedirs(f"{top}/{d}")
        spec = cm.lower_spec(BIG_BLOCKS)
        cm.build_lower(f"{top}/l", spec)
        ctx = {"top": top, "binary": args.binary, "initial": cm.initial_model(spec),
               "lower": lower_state(f"{top}/l", False), "cleanup": cleanup}
        hashed = lower_state(f"{top}/l", True)
        ctx["calib"] = calibrate(args.binary, top)
        print(f"a mount cleans a planted workdir tree in {ctx['calib']:.3f} s")
        for it in range(1, args.iterations + 1):
            try:
                what, problems, inflight = iteration(ctx, rnd, it)
            except Exception as e:  # noqa: BLE001 - a broken iteration fails, the loop goes on
                what, problems, inflight = "error", [f"{type(e).__name__}: {e}"], None
                kill_leftovers()
                unmount(f"{top}/m")
            kinds[inflight["op"] if inflight else "none"] += 1
            if it == args.iterations:
                problems += lower_changes(hashed, lower_state(f"{top}/l", True))
            if problems:
                failed += 1
                print(f"FAIL iteration {it} ({what})")
                for p in problems[:40]:
                    print(f"  {p}")
            else:
                passed += 1
                print(f"PASS iteration {it} ({what})", flush=True)
    finally:
        kill_leftovers()
        unmount(f"{top}/m")
        shutil.rmtree(top, ignore_errors=True)
    print("operations in flight at the kills: "
          + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    if cleanup:
        print("remounts killed before, during, after their workdir cleanup: "
              + ", ".join(str(cleanup[k]) for k in ("before", "during", "after")))
    print(f"crash loop: {args.iterations} kills in {time.time() - started:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
