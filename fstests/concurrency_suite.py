#!/usr/bin/env python3
"""Concurrency: many processes copying up, renaming, unlinking, creating and listing in the
SAME directories of a lower tree at once, on stratafs, kernel overlayfs and fuse-overlayfs;
afterwards the merged tree is checked against a model, and again after a remount.

Why: a FUSE overlay serves requests on several threads; copy-up, whiteout creation and
directory merging of one directory by many callers at once is where locking mistakes live
(two copy-ups of one file, a rename racing a readdir, a whiteout lost to a concurrent create),
and where deadlocks hide. Single-threaded suites cannot see any of that.

How the result stays checkable: worker w only ever changes names that carry its own prefix
(w3f1, w3n17, ...), but all workers share the directories d0..d3 of the lower tree. Each
worker keeps an in-memory model of its own objects and applies every operation to it as it
returns (a rename of a directory from a lower layer may give EXDEV, which the model takes as
"nothing changed"; any other unexpected result is a failure). Its readdirs run while the
others change the same directories and must give each name once, exactly its own names as its
model has them, and others' names only if they ever existed. The union of the models is the
expected final tree. First, all workers copy up the same lower files at once (each writes its
own slot past the end and sets its own xattr) and create files in one deep lower directory.

Watchdog: each worker stores the start time of its current operation in shared memory; a
monitor fails the run when one takes over 30 s, dumps the kernel stacks of the worker and of
the daemon's threads, aborts the FUSE connection, detaches the mount and kills the daemon.

Cases per target: the copy-up race, no hang, every operation as modeled, readdir consistent,
final tree as modeled, and the same tree (and no stray names in the upper layer) after a
remount on the same upper layer.

Usage: python3 fstests/concurrency_suite.py [--binary PATH] [--targets stratafs,kernel,...]
       [--long] [--seconds N] [--workers N]
Ends with "N passed, M failed" for stratafs.
"""

import argparse
import json
import mmap
import os
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import union  # noqa: E402
from union import Union, errname  # noqa: E402

DIRS = ["d0", "d1", "d2", "d3"]
FILES, SUBDIRS, SHARED = 6, 2, 8
REC = 64  # bytes each worker writes into each shared file
HANG = 30
SLOT = 128  # shared memory per worker: start time (double) + op text


def lower_content(rel):
    return (f"lower {rel}\n" * 3).encode()


def build_lower(lower, workers):
    for d in DIRS:
        os.makedirs(os.path.join(lower, d))
        for w in range(workers):
            for k in range(FILES):
                write(os.path.join(lower, d, f"w{w}f{k}"), lower_content(f"{d}/w{w}f{k}"))
            for k in range(SUBDIRS):
                sd = os.path.join(lower, d, f"w{w}s{k}")
                os.makedirs(sd)
                for c in ("a", "b"):
                    write(os.path.join(sd, c), lower_content(f"{d}/w{w}s{k}/{c}"))
    os.makedirs(os.path.join(lower, "deep/x/y/z"))
    write(os.path.join(lower, "deep/x/y/z/lowerfile"), b"deep\n")
    for k in range(SHARED):
        write(os.path.join(lower, f"shared{k}"), lower_content(f"shared{k}"))


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def initial_model(w):
    """Worker w's objects: rel path -> ["f", mode, content hex, origin] or
    ["d", mode, "", origin]; origin "lower" or "new"."""
    m = {}
    for d in DIRS:
        for k in range(FILES):
            m[f"{d}/w{w}f{k}"] = ["f", 0o644, lower_content(f"{d}/w{w}f{k}").hex(), "lower"]
        for k in range(SUBDIRS):
            m[f"{d}/w{w}s{k}"] = ["d", 0o755, "", "lower"]
            for c in ("a", "b"):
                m[f"{d}/w{w}s{k}/{c}"] = ["f", 0o644,
                                          lower_content(f"{d}/w{w}s{k}/{c}").hex(), "lower"]
    return m


# ---------------------------------------------------------------- a worker

class Worker:
    def __init__(self, w, mnt, shm, seed):
        self.w, self.mnt, self.shm = w, mnt, shm
        self.rng = random.Random(seed * 1000 + w)
        self.model = initial_model(w)
        self.counter = 0
        self.errors, self.readdir_bad, self.ops = [], [], 0
        self.created = {d: set() for d in DIRS}
        self.seen = {d: set() for d in DIRS}

    def timed(self, what, fn, *args):
        off = self.w * SLOT
        self.shm[off + 8:off + SLOT] = what.encode()[:SLOT - 8].ljust(SLOT - 8, b"\0")
        struct.pack_into("d", self.shm, off, time.time())
        try:
            return fn(*args)
        finally:
            struct.pack_into("d", self.shm, off, 0.0)
            self.ops += 1

    def p(self, rel):
        return os.path.join(self.mnt, rel)

    def own(self, kind, top=False):
        names = [k for k, v in self.model.items()
                 if v[0] == kind and (not top or k.count("/") == 1)]
        return self.rng.choice(sorted(names)) if names else None

    def new_name(self):
        self.counter += 1
        d = self.rng.choice(DIRS)
        name = f"w{self.w}n{self.counter}"
        self.created[d].add(name)
        return f"{d}/{name}"

    def fail(self, what, e):
        self.errors.append(f"w{self.w} {what}: {errname(e)}")

    # ---- the operations; each returns after updating the model
    def op_append(self):
        rel = self.own("f")
        data = os.urandom(self.rng.randint(8, 64))

        def do():
            fd = os.open(self.p(rel), os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        self.timed(f"append {rel}", do)
        self.model[rel][2] += data.hex()

    def op_chmod(self):
        rel = self.own("f")
        mode = self.rng.choice([0o600, 0o640, 0o644, 0o755, 0o700])
        self.timed(f"chmod {rel}", os.chmod, self.p(rel), mode)
        self.model[rel][1] = mode

    def op_truncate(self):
        rel = self.own("f")
        old = bytes.fromhex(self.model[rel][2])
        n = self.rng.randint(0, len(old) + 16)
        self.timed(f"truncate {rel}", os.truncate, self.p(rel), n)
        self.model[rel][2] = (old[:n] + b"\0" * (n - len(old))).hex()

    def op_create(self):
        rel = self.new_name()
        data = f"new {rel}\n".encode()
        self.timed(f"create {rel}", write, self.p(rel), data)
        self.model[rel] = ["f", 0o644, data.hex(), "new"]

    def op_unlink(self):
        rel = self.own("f", top=True)
        self.timed(f"unlink {rel}", os.unlink, self.p(rel))
        del self.model[rel]

    def op_rename_file(self):
        src = self.own("f", top=True)
        if self.rng.random() < 0.3:  # over another of our files
            dst = self.own("f", top=True)
            if dst == src:
                return
        else:
            dst = self.new_name()
        self.timed(f"rename {src} {dst}", os.rename, self.p(src), self.p(dst))
        self.model[dst] = self.model.pop(src)

    def op_rename_dir(self):
        src = self.own("d", top=True)
        dst = self.new_name()
        try:
            self.timed(f"rename {src} {dst}", os.rename, self.p(src), self.p(dst))
        except OSError as e:
            if e.errno == 18 and self.model[src][3] == "lower":  # EXDEV: no redirect_dir
                return
            raise
        for k in [k for k in self.model if k == src or k.startswith(src + "/")]:
            self.model[dst + k[len(src):]] = self.model.pop(k)

    def op_mkdir(self):
        rel = self.new_name()
        self.timed(f"mkdir {rel}", os.mkdir, self.p(rel))
        self.model[rel] = ["d", 0o755, "", "new"]
        data = b"in a new dir\n"
        self.timed(f"create {rel}/c", write, self.p(rel + "/c"), data)
        self.model[rel + "/c"] = ["f", 0o644, data.hex(), "new"]

    def op_rmdir(self):
        rel = self.own("d", top=True)
        for k in sorted(k for k in self.model if k.startswith(rel + "/")):
            self.timed(f"unlink {k}", os.unlink, self.p(k))
            del self.model[k]
        self.timed(f"rmdir {rel}", os.rmdir, self.p(rel))
        del self.model[rel]

    def op_read(self):
        rel = self.own("f")

        def do():
            with open(self.p(rel), "rb") as f:
                return f.read(), stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        data, mode = self.timed(f"read {rel}", do)
        if data.hex() != self.model[rel][2] or mode != self.model[rel][1]:
            self.errors.append(f"w{self.w} read {rel}: {len(data)} bytes mode {mode:o}, model "
                               f"{len(self.model[rel][2]) // 2} bytes mode {self.model[rel][1]:o}")

    def op_readdir(self):
        d = self.rng.choice(DIRS)
        names = self.timed(f"readdir {d}", os.listdir, self.p(d))
        if len(names) != len(set(names)):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            self.readdir_bad.append(f"w{self.w} readdir {d}: duplicates {dup}")
        me = f"w{self.w}"
        mine = {n for n in names if n.startswith(me) and n[len(me):][:1].isalpha()}
        want = {k.split("/")[1] for k in self.model if k.count("/") == 1 and k.startswith(d + "/")}
        if mine != want:
            self.readdir_bad.append(f"w{self.w} readdir {d}: own names missing "
                                    f"{sorted(want - mine)[:5]}, extra {sorted(mine - want)[:5]}")
        self.seen[d].update(names)

    def step(self):
        files = sum(1 for k, v in self.model.items() if v[0] == "f" and k.count("/") == 1)
        dirs = sum(1 for k, v in self.model.items() if v[0] == "d" and k.count("/") == 1)
        ops = [self.op_read, self.op_readdir, self.op_readdir, self.op_create, self.op_mkdir]
        if files:
            ops += [self.op_append, self.op_append, self.op_chmod, self.op_truncate,
                    self.op_rename_file, self.op_rename_file]
        if files > 4:
            ops.append(self.op_unlink)
        if dirs:
            ops += [self.op_rename_dir, self.op_rename_dir]
        if dirs > 2:
            ops.append(self.op_rmdir)
        op = self.rng.choice(ops)
        try:
            op()
        except OSError as e:
            self.fail(op.__name__, e)

    def copy_up_race(self, start):
        """All workers at once: a slot past the end and an xattr on every shared lower file, a
        new file in one deep lower directory."""
        while time.time() < start:
            time.sleep(0.001)
        for k in range(SHARED):
            rel = f"shared{k}"
            off = len(lower_content(rel)) + self.w * REC

            def do():
                fd = os.open(self.p(rel), os.O_WRONLY)
                try:
                    os.pwrite(fd, f"w{self.w}".encode().ljust(REC, b"."), off)
                finally:
                    os.close(fd)
            try:
                self.timed(f"pwrite {rel}", do)
                self.timed(f"setxattr {rel}", os.setxattr, self.p(rel), f"user.w{self.w}",
                           b"v")
            except OSError as e:
                self.fail(f"copy-up race {rel}", e)
        try:
            self.timed("create deep", write, self.p(f"deep/x/y/z/w{self.w}"), b"deep new\n")
        except OSError as e:
            self.fail("copy-up race deep/x/y/z", e)

    def run(self, start, seconds):
        self.copy_up_race(start)
        end = time.time() + seconds
        while time.time() < end:
            if len(self.errors) > 20:
                break
            self.step()

    def result(self):
        return {"model": self.model, "errors": self.errors, "readdir_bad": self.readdir_bad,
                "ops": self.ops, "created": {d: sorted(v) for d, v in self.created.items()},
                "seen": {d: sorted(v) for d, v in self.seen.items()}}


# ---------------------------------------------------------------- the run

def start_workers(n, mnt, shm, seed, seconds, results):
    pids, start = [], time.time() + 0.3
    for w in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                wk = Worker(w, mnt, shm, seed)
                try:
                    wk.run(start, seconds)
                except Exception as e:  # noqa: BLE001 - a broken worker is a failure
                    wk.errors.append(f"w{w} crashed: {type(e).__name__}: {e}")
                with open(os.path.join(results, f"w{w}.json"), "w") as f:
                    json.dump(wk.result(), f)
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        pids.append(pid)
    return pids


def monitor(pids, shm, u, seconds):
    """Waits for the workers; returns None, or a description of the hang (after the rescue)."""
    left, deadline = set(pids), time.time() + seconds + 5 * HANG
    while left:
        for pid in list(left):
            if os.waitpid(pid, os.WNOHANG)[0]:
                left.discard(pid)
        now, stuck = time.time(), []
        for i, pid in enumerate(pids):
            t0 = struct.unpack_from("d", shm, i * SLOT)[0]
            if pid in left and t0 and now - t0 > HANG:
                what = bytes(shm[i * SLOT + 8:(i + 1) * SLOT]).rstrip(b"\0").decode()
                stuck.append((pid, f"w{i}: {what} for {now - t0:.0f} s"))
        if stuck or (left and now > deadline):
            dump = u.rescue([p for p, _ in stuck] or list(left))
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            for pid in left:
                union.reap(pid, 10)
            what = "; ".join(s for _, s in stuck) or "workers did not finish"
            return f"{what}; stacks: {' | '.join(dump)[:1500]}"
        time.sleep(0.1)
    return None


def describe_tree(root):
    """rel path -> "f mode sha" / "d mode" / "l target" / "c rdev" for everything under root."""
    import hashlib
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = f"{stat.S_IMODE(st.st_mode):o}"
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = f"f {mode} {hashlib.sha256(f.read()).hexdigest()[:16]}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"d {mode}"
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = f"l {os.readlink(p)}"
            else:
                out[rel] = f"{stat.filemode(st.st_mode)[0]} {st.st_rdev}"
    return out


def expected_tree(results, workers):
    import hashlib
    out = {"deep": "d 755", "deep/x": "d 755", "deep/x/y": "d 755", "deep/x/y/z": "d 755",
           "deep/x/y/z/lowerfile": "f 644 " + hashlib.sha256(b"deep\n").hexdigest()[:16]}
    for d in DIRS:
        out[d] = "d 755"
    for w in range(workers):
        out[f"deep/x/y/z/w{w}"] = "f 644 " + hashlib.sha256(b"deep new\n").hexdigest()[:16]
    for k in range(SHARED):
        base = lower_content(f"shared{k}")
        data = base + b"".join(f"w{w}".encode().ljust(REC, b".") for w in range(workers))
        out[f"shared{k}"] = "f 644 " + hashlib.sha256(data).hexdigest()[:16]
    for r in results:
        for rel, (kind, mode, content, _) in r["model"].items():
            out[rel] = (f"f {mode:o} {hashlib.sha256(bytes.fromhex(content)).hexdigest()[:16]}"
                        if kind == "f" else f"d {mode:o}")
    return out


def tree_diff(want, got, limit=6):
    lines = [f"{k}: want {want.get(k)}, got {got.get(k)}" for k in sorted(set(want) | set(got))
             if want.get(k) != got.get(k)]
    return "; ".join(lines[:limit]) + (f"; ... {len(lines) - limit} more" if len(lines) > limit
                                       else "")


def check_final(mnt, workers):
    """In the (timed) child: the merged tree and the shared files' xattrs."""
    tree = describe_tree(mnt)
    missing = []
    for k in range(SHARED):
        names = os.listxattr(os.path.join(mnt, f"shared{k}"))
        missing += [f"shared{k}:user.w{w}" for w in range(workers) if f"user.w{w}" not in names]
    return {"tree": tree, "xattrs_missing": missing}


def stray_upper_names(upper, results, workers):
    """Names in the upper layer that no operation ever made (leaked temporaries)."""
    known = {"a", "b", "c", "deep", "x", "y", "z", "lowerfile"} | set(DIRS)
    known |= {f"shared{k}" for k in range(SHARED)} | {f"w{w}" for w in range(workers)}
    for w in range(workers):
        known |= {f"w{w}f{k}" for k in range(FILES)} | {f"w{w}s{k}" for k in range(SUBDIRS)}
    for r in results:
        for names in r["created"].values():
            known.update(names)
    stray = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in dirnames + filenames:
            base = n[4:] if n.startswith(".wh.") else n
            if base not in known and n not in (".wh..wh..opq", ".wh..opq"):
                stray.append(os.path.relpath(os.path.join(dirpath, n), upper))
    return stray


def readdir_problems(results, workers):
    ever = {d: {f"w{w}f{k}" for w in range(workers) for k in range(FILES)} |
            {f"w{w}s{k}" for w in range(workers) for k in range(SUBDIRS)} for d in DIRS}
    for r in results:
        for d, names in r["created"].items():
            ever[d].update(names)
    bad = [b for r in results for b in r["readdir_bad"]]
    for r in results:
        for d, names in r["seen"].items():
            never = sorted(set(names) - ever[d])
            if never:
                bad.append(f"readdir {d}: names that never existed {never[:5]}")
    return bad


def cases(target, binary, scratch, seconds=5, workers=12, seed=None):
    """Yields (ok, what) for each case on `target`."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    os.umask(0o022)
    base = tempfile.mkdtemp(prefix=f"conc-{target}-", dir=scratch)
    dirs = {k: os.path.join(base, k) for k in ("l", "u", "w", "m", "results")}
    for p in dirs.values():
        os.makedirs(p)
    build_lower(dirs["l"], workers)
    u = Union(target, binary, [dirs["l"]], dirs["u"], dirs["w"], dirs["m"])
    shm = mmap.mmap(-1, SLOT * workers)
    tag = f"{workers} workers, {seconds} s, seed {seed}"
    try:
        try:
            u.mount()
        except RuntimeError as e:
            yield False, f"mount: {e}"
            return
        pids = start_workers(workers, dirs["m"], shm, seed, seconds, dirs["results"])
        hang = monitor(pids, shm, u, seconds)
        yield hang is None, f"no request over {HANG} s ({tag})" + (f": {hang}" if hang else "")
        if hang:
            return
        results, lost = [], []
        for w in range(workers):
            try:
                with open(os.path.join(dirs["results"], f"w{w}.json")) as f:
                    results.append(json.load(f))
            except (OSError, ValueError):
                lost.append(f"w{w}")
        ops = sum(r["ops"] for r in results)
        errors = [e for r in results for e in r["errors"]] + [f"{w} left no result" for w in lost]
        race = [e for e in errors if "copy-up race" in e]
        yield not errors, f"every operation as modeled ({ops} operations)" + (
            f": {'; '.join(errors[:6])}" if errors else "")
        bad = readdir_problems(results, workers)
        yield not bad, "readdir consistent under concurrent changes" + (
            f": {'; '.join(bad[:6])}" if bad else "")
        want = expected_tree(results, workers)
        ok, got = union.in_child(lambda: check_final(dirs["m"], workers), 120, u)
        if not ok:
            yield False, f"final tree: {got}"
            return
        race_tree = {k: v for k, v in want.items() if k.startswith(("shared", "deep"))}
        race_diff = tree_diff(race_tree, {k: v for k, v in got["tree"].items()
                                          if k.startswith(("shared", "deep"))})
        race_bad = race + ([race_diff] if race_diff else []) + got["xattrs_missing"][:5]
        yield not race_bad, f"copy-up race: {workers} writers on {SHARED} lower files and one " \
            "deep lower dir" + (f": {'; '.join(race_bad)}" if race_bad else "")
        d = tree_diff(want, got["tree"])
        yield not d, "final merged tree as modeled" + (f": {d}" if d else "")
        yield from check_remount(u, got["tree"], dirs, results, workers)
    finally:
        try:
            u.umount()
        except Exception:  # noqa: BLE001 - keep cleaning up
            u.rescue()
        shutil.rmtree(base, ignore_errors=True)


def check_remount(u, before, dirs, results, workers):
    try:
        u.umount()
        stray = stray_upper_names(dirs["u"], results, workers)
        u.mount()
    except (RuntimeError, OSError) as e:
        yield False, f"remount: {e}"
        return
    ok, got = union.in_child(lambda: describe_tree(dirs["m"]), 120, u)
    if not ok:
        yield False, f"remount: {got}"
        return
    d = tree_diff(before, got)
    problems = ([f"differs after remount: {d}"] if d else []) + (
        [f"stray names in the upper layer: {stray[:6]}"] if stray else [])
    yield not problems, "same tree after a remount, no stray names in the upper layer" + (
        f": {'; '.join(problems)}" if problems else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=union.DEFAULT_BINARY)
    ap.add_argument("--targets", default=",".join(union.TARGETS))
    ap.add_argument("--long", action="store_true", help="60 s of operations instead of 5")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("concurrency: run as root")
    union.enter_private_mount_namespace()
    scratch = tempfile.mkdtemp(prefix="stratafs-concurrency-", dir="/var/tmp")
    try:
        return union.run_and_count(
            args.targets.split(","),
            lambda target: cases(target, os.path.abspath(args.binary), scratch,
                                 args.seconds or (60 if args.long else 5), args.workers,
                                 args.seed))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
