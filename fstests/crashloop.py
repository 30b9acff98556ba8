#!/usr/bin/env python3
"""Crash safety: SIGKILL the stratafs daemon in the middle of copy-ups of large files, renames
and whiteout creation, at random moments, again and again; after each remount check that

  1. every large file shows either its lower content, or its lower content followed by a
     prefix of what was appended to it; never a half copy (each 4 KiB block carries its own
     file name and block number, so a missing, zeroed or misplaced block shows);
  2. every file whose fsync returned before the kill (recorded in a journal outside the mount)
     is there with all its content;
  3. each renamed object is under exactly one of its names;
  4. the workdir holds nothing but what the mount itself keeps (its temporaries are gone)
     and the upper layer holds no temporary;
  5. the whole merged tree can be walked and read.

Why: copy-up and rename go through the workdir so that a killed daemon leaves the old or the
new state, never a half file, and the next mount cleans up. Only killing it tells.

Usage: python3 fstests/crashloop.py [--binary PATH] [--iterations N] [--seed S]
Ends with the line "N passed, M failed" (one per iteration).
"""

import argparse
import os
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

BLOCK = 4096
BIG_FILES = 6
BIG_BLOCKS = 8192  # 32 MiB each
SMALL_FILES = 300
TAG = b"appended-after-copy-up\n"


def block(name, i):
    """The content of block `i` of big file `name`: its own name and number, repeated."""
    unit = f"{name}:{i:08d};".encode()
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def build_lower(lower):
    os.makedirs(f"{lower}/big")
    for n in range(BIG_FILES):
        name = f"f{n}"
        with open(f"{lower}/big/{name}", "wb") as f:
            for i in range(BIG_BLOCKS):
                f.write(block(name, i))
    for d in range(3):
        os.makedirs(f"{lower}/tree{d}/sub")
        for i in range(20):
            with open(f"{lower}/tree{d}/sub/file{i}", "w") as f:
                f.write(f"tree{d} file{i}\n")
    os.makedirs(f"{lower}/small")
    for i in range(SMALL_FILES):
        with open(f"{lower}/small/s{i}", "w") as f:
            f.write(f"small {i}\n")


# ---------------------------------------------------------------- the workload (a child)

def workload(mnt, journal, seed):
    """Runs until killed: copy-ups of big files, renames there and back, deletions, new
    fsynced files recorded in `journal` after their fsync returned."""
    rnd = random.Random(seed)
    jf = open(journal, "a")
    n = 0
    while True:
        n += 1
        op = rnd.choice(["append", "append", "chmod", "truncate-same", "rename-dir",
                         "rename-file", "delete", "new-fsync"])
        try:
            if op == "append":
                name = f"f{rnd.randrange(BIG_FILES)}"
                with open(f"{mnt}/big/{name}", "ab") as f:
                    f.write(TAG)
            elif op == "chmod":
                os.chmod(f"{mnt}/big/f{rnd.randrange(BIG_FILES)}", rnd.choice([0o600, 0o644]))
            elif op == "truncate-same":
                p = f"{mnt}/big/f{rnd.randrange(BIG_FILES)}"
                os.truncate(p, os.stat(p).st_size)
            elif op == "rename-dir":
                d = rnd.randrange(3)
                a, b = f"{mnt}/tree{d}", f"{mnt}/tree{d}.moved"
                if os.path.exists(a):
                    os.rename(a, b)
                elif os.path.exists(b):
                    os.rename(b, a)
            elif op == "rename-file":
                i = rnd.randrange(SMALL_FILES)
                a, b = f"{mnt}/small/s{i}", f"{mnt}/small/s{i}.renamed"
                if os.path.exists(a):
                    os.rename(a, b)
                elif os.path.exists(b):
                    os.rename(b, a)
            elif op == "delete":
                p = f"{mnt}/small/s{rnd.randrange(SMALL_FILES)}"
                if os.path.exists(p):
                    os.unlink(p)
            elif op == "new-fsync":
                name = f"new-{seed}-{n}"
                data = f"fsynced {name}\n".encode() * rnd.randint(1, 500)
                fd = os.open(f"{mnt}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                jf.write(f"{name} {len(data)}\n")
                jf.flush()
                os.fsync(jf.fileno())
        except OSError:
            # The daemon may already be dead: stop quietly, the parent kills us anyway.
            time.sleep(0.01)


# ---------------------------------------------------------------- checks

def check_big(mnt, problems):
    for n in range(BIG_FILES):
        name = f"f{n}"
        p = f"{mnt}/big/{name}"
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            problems.append(f"big/{name}: {e}")
            continue
        base = BIG_BLOCKS * BLOCK
        if len(data) < base:
            problems.append(f"big/{name}: {len(data)} bytes, shorter than the lower file")
            continue
        for i in range(BIG_BLOCKS):
            if data[i * BLOCK:(i + 1) * BLOCK] != block(name, i):
                problems.append(f"big/{name}: block {i} is not the lower file's")
                break
        tail = data[base:]
        whole = TAG * (len(tail) // len(TAG) + 1)
        if tail != whole[:len(tail)]:
            problems.append(f"big/{name}: {len(tail)} appended bytes that were never written")


def check_journal(mnt, journal, problems):
    if not os.path.exists(journal):
        return
    with open(journal) as f:
        for line in f:
            name, size = line.split()
            p = f"{mnt}/{name}"
            try:
                data = open(p, "rb").read()
            except OSError as e:
                problems.append(f"fsynced {name}: {e}")
                continue
            unit = f"fsynced {name}\n".encode()
            if len(data) != int(size) or data != unit * (len(data) // len(unit)):
                problems.append(f"fsynced {name}: {len(data)} bytes, expected {size}")


def check_renames(mnt, problems):
    for d in range(3):
        a, b = os.path.exists(f"{mnt}/tree{d}"), os.path.exists(f"{mnt}/tree{d}.moved")
        if a == b:
            problems.append(f"tree{d}: {'both names' if a else 'neither name'}")
        root = f"{mnt}/tree{d}" if a else f"{mnt}/tree{d}.moved"
        if a != b and len(os.listdir(f"{root}/sub")) != 20:
            problems.append(f"tree{d}: {len(os.listdir(f'{root}/sub'))} files, expected 20")
    for i in range(SMALL_FILES):
        a = os.path.exists(f"{mnt}/small/s{i}")
        b = os.path.exists(f"{mnt}/small/s{i}.renamed")
        if a and b:
            problems.append(f"small/s{i}: under both names")


def check_walk(mnt, problems):
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                os.lstat(p)
                if not os.path.islink(p):
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
            except OSError as e:
                problems.append(f"walk {os.path.relpath(p, mnt)}: {e}")


def check_leftovers(top, problems):
    work = f"{top}/w/work"
    if os.path.isdir(work) and os.listdir(work):
        problems.append(f"workdir not cleaned: {sorted(os.listdir(work))[:5]}")
    for dirpath, dirnames, filenames in os.walk(f"{top}/u"):
        for n in dirnames + filenames:
            if n.startswith("#"):
                problems.append(f"temporary in the upper layer: {os.path.join(dirpath, n)}")


# ---------------------------------------------------------------- the loop

def mount(binary, top):
    opts = f"lowerdir={top}/l,upperdir={top}/u,workdir={top}/w"
    # The daemon's log goes to a file: a pipe nobody reads would block it once full.
    log = open(f"{top}/daemon.log", "ab")
    return subprocess.Popen([binary, "-f", "-o", opts, f"{top}/m"],
                            stdout=subprocess.DEVNULL, stderr=log)


def daemon_log(top):
    with open(f"{top}/daemon.log", "rb") as f:
        return f.read().decode(errors="replace")[-2000:]


def wait_mounted(top, daemon, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if common.is_mounted(f"{top}/m"):
            return True
        if daemon.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def clear_dead_mount(top):
    mnt = f"{top}/m"
    for cmd in (["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
        if common.is_mounted(mnt):
            subprocess.run(cmd, stderr=subprocess.DEVNULL)


def iteration(binary, top, rnd, it):
    """One crash on a fresh upper layer (so that every big file is copied up again): mount,
    run the workload, kill at a random moment, remount, check."""
    for d in ("u", "w"):
        shutil.rmtree(f"{top}/{d}", ignore_errors=True)
        os.makedirs(f"{top}/{d}")
    if os.path.exists(f"{top}/journal"):
        os.unlink(f"{top}/journal")
    daemon = mount(binary, top)
    if not wait_mounted(top, daemon):
        return "mount", [f"mount failed: {daemon_log(top)}"]
    journal = f"{top}/journal"
    child = os.fork()
    if child == 0:
        try:
            workload(f"{top}/m", journal, rnd.randrange(1 << 30))
        finally:
            os._exit(0)
    # Half the kills early, while the first copy-ups of the big files run.
    delay = rnd.uniform(0.005, 0.15) if rnd.random() < 0.5 else rnd.uniform(0.15, 1.5)
    time.sleep(delay)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    clear_dead_mount(top)
    # What the killed daemon left half done in the workdir (the remount must clean it up).
    work = f"{top}/w/work"
    left = 0
    if os.path.isdir(work):
        # Not counting the whiteout device new whiteouts are linked from.
        left = sum(1 for e in os.scandir(work)
                   if not stat.S_ISCHR(e.stat(follow_symlinks=False).st_mode))
    what = f"kill after {delay:.3f} s, {left} unfinished in the workdir"
    daemon = mount(binary, top)
    problems = []
    if not wait_mounted(top, daemon):
        return what, [f"remount failed: {daemon_log(top)}"]
    try:
        check_leftovers(top, problems)
        check_big(f"{top}/m", problems)
        check_journal(f"{top}/m", journal, problems)
        check_renames(f"{top}/m", problems)
        check_walk(f"{top}/m", problems)
    finally:
        common.unmount(f"{top}/m")
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            problems.append("the daemon was still running 30 s after its unmount")
    if "panicked" in daemon_log(top):
        problems.append(f"the daemon panicked: {daemon_log(top)}")
    return what, problems


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
    rnd = random.Random(args.seed)
    top = tempfile.mkdtemp(prefix="crashloop-", dir="/var/tmp")
    passed = failed = 0
    started = time.time()
    try:
        for d in ("l", "u", "w", "m"):
            os.makedirs(f"{top}/{d}")
        build_lower(f"{top}/l")
        for it in range(1, args.iterations + 1):
            what, problems = iteration(args.binary, top, rnd, it)
            if problems:
                failed += 1
                print(f"FAIL iteration {it} ({what})")
                for p in problems[:10]:
                    print(f"  {p}")
            else:
                passed += 1
                print(f"PASS iteration {it} ({what})")
    finally:
        clear_dead_mount(top)
        common.unmount(f"{top}/m")
        shutil.rmtree(top, ignore_errors=True)
    print(f"crash loop: {args.iterations} kills in {time.time() - started:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
