"""The workload of fstests/crashloop.py: every kind of write a container does to its root, at
random, on a stratafs mount, until the daemon is killed under it.

Each operation is chosen from the model of the merged tree (fstests/crashmodel.py), so that
it is meant to succeed (or meant to fail with one errno: RENAME_NOREPLACE or O_EXCL onto an
existing name, rmdir of a non-empty directory), journaled before it starts and after it
returned, performed with one system call where possible, and applied to the model. Some
operations come in the sequences containers use: create with O_EXCL, write, fsync, close;
open with O_TRUNC and rewrite; write a temporary, fsync, rename it over the file (atomic
replace); empty a lower directory and remove it; remove a lower directory and recreate it.
The first operations touch every large lower file, so that early kills land in copy-ups.
"""

import ctypes
import errno
import os

from crashmodel import (BIG, BLOCK, DEATH, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE,
                        LOWER_MTIME_NS, RENAME_EXCHANGE, RENAME_NOREPLACE, apply,
                        journal_line, nblocks, pattern)

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
AT_FDCWD = -100

WEIGHTS = {"write": 12, "overwrite": 3, "truncate": 5, "fallocate": 4, "create": 8,
           "replace": 4, "unlink": 5, "mkdir": 3, "rmdir": 3, "recreate": 2,
           "rename-over": 5, "rename-new": 4, "rename-dir": 3, "exchange": 3,
           "noreplace": 3, "link": 4, "symlink": 2, "mkfifo": 2, "setxattr": 4,
           "removexattr": 2, "chmod": 3, "chown": 2, "utime": 3, "fsync": 3, "fdatasync": 2,
           "syncfs": 1, "fsyncdir": 1, "fail-create": 1, "fail-rmdir": 1}


def _check(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Workload:
    def __init__(self, mnt, model, rnd, journal):
        self.mnt, self.m, self.rnd = mnt, model, rnd
        self.jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.n = 0
        self.removed_lower_dirs = set()

    # ------------------------------------------------------------ running

    def run_forever(self):
        os.umask(0o022)
        self.run(self.touch_big_files())
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        while True:
            kind = self.rnd.choices(kinds, weights)[0]
            self.run(getattr(self, "gen_" + kind.replace("-", "_"))())

    def run(self, steps):
        """Performs a sequence of operations, journaling each; stops the sequence at the
        first unexpected error, and everything when the daemon is gone."""
        held = {}
        try:
            for op in steps:
                os.write(self.jfd, journal_line("B", op).encode())
                try:
                    self.perform(op, held)
                except OSError as e:
                    os.write(self.jfd, journal_line("E", n=op["n"], err=e.errno).encode())
                    if e.errno in DEATH:
                        while True:  # the daemon is dead: wait for our own SIGKILL
                            os.pause()
                    if e.errno != op.get("expect"):
                        return
                    continue
                os.write(self.jfd, journal_line("D", n=op["n"]).encode())
                apply(self.m, op)
        finally:
            for fd in held.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def perform(self, op, held):
        k = op["op"]
        P = lambda key="path": os.path.join(self.mnt, op[key])  # noqa: E731
        if k == "create":
            fd = os.open(P(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            held[op["path"]] = fd
        elif k in ("write", "truncate", "fallocate", "fsync", "fdatasync"):
            self.data_op(op, held, P())
        elif k == "syncfs":
            fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _check(libc.syncfs(fd))
            finally:
                os.close(fd)
        elif k == "fsyncdir":
            fd = os.open(P(), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif k == "unlink":
            os.unlink(P())
        elif k == "rmdir":
            os.rmdir(P())
        elif k == "mkdir":
            os.mkdir(P(), 0o755)
        elif k == "rename":
            if op.get("flags"):
                _check(libc.renameat2(AT_FDCWD, os.fsencode(P("src")), AT_FDCWD,
                                      os.fsencode(P("dst")), op["flags"]))
            else:
                os.rename(P("src"), P("dst"))
        elif k == "link":
            os.link(P("src"), P("dst"))
        elif k == "symlink":
            os.symlink(op["target"], P())
        elif k == "mkfifo":
            os.mkfifo(P(), 0o666)
        elif k == "setxattr":
            os.setxattr(P(), op["name"], op["value"].encode())
        elif k == "removexattr":
            os.removexattr(P(), op["name"])
        elif k == "chmod":
            os.chmod(P(), op["mode"])
        elif k == "chown":
            os.chown(P(), op["uid"], op["gid"])
        elif k == "utime":
            os.utime(P(), ns=(op["mtime"], op["mtime"]))
        else:
            raise ValueError(k)

    def data_op(self, op, held, path):
        """write, truncate, fallocate, fsync, fdatasync: through the descriptor the sequence
        holds (via=fd), one opened with O_TRUNC (via=otrunc, kept), or a new one."""
        k, via = op["op"], op.get("via")
        if via == "fd":
            fd, own = held[op["path"]], False
        elif via == "otrunc":
            fd = held[op["path"]] = os.open(path, os.O_WRONLY | os.O_TRUNC)
            return
        elif k == "truncate":
            os.truncate(path, op["size"])
            return
        else:
            fd, own = os.open(path, os.O_RDONLY if via == "ro" else os.O_WRONLY), True
        try:
            if k == "write":
                os.pwrite(fd, pattern(op["fid"], op["idx"], op["n"]), op["idx"] * BLOCK)
            elif k == "truncate":
                os.ftruncate(fd, op["size"])
            elif k == "fallocate":
                _check(libc.fallocate(fd, op["mode"], op["off"], op["len"]))
            elif k == "fsync":
                os.fsync(fd)
            else:
                os.fdatasync(fd)
        finally:
            if own:
                os.close(fd)

    # ------------------------------------------------------------ choosing

    def op(self, kind, **kw):
        self.n += 1
        return {"n": self.n, "op": kind, **kw}

    def pick(self, kinds, exclude=()):
        paths = [p for p in self.m.of_kind(kinds) if p not in exclude]
        return self.rnd.choice(paths) if paths else None

    def pick_file(self, big_bias=0.25):
        if self.rnd.random() < big_bias:
            big = [p for p, fid in self.m.paths.items() if fid in BIG]
            if big:
                return self.rnd.choice(big)
        return self.pick("f")

    def new_name(self, prefix, parent=None):
        if parent is None:
            dirs = [d for d in self.m.of_kind("d") if d.count("/") < 3] + [""]
            parent = self.rnd.choice(dirs)
        name = f"{prefix}{self.n + 1}"
        return f"{parent}/{name}" if parent else name

    def size(self, path):
        return self.m.obj(path).states[-1][0]

    def touch_big_files(self):
        """One copying operation on each large lower file, in random order."""
        steps = []
        for fid in self.rnd.sample(BIG, len(BIG)):
            path = f"big/{fid}"
            kind = self.rnd.choice(["write", "write", "truncate", "punch", "chmod", "setxattr",
                                    "fsync", "utime", "link"])
            if kind == "write":
                nb = nblocks(self.size(path))
                steps.append(self.op("write", path=path, fid=fid, idx=self.rnd.randrange(nb + 1)))
            elif kind == "truncate":
                steps.append(self.op("truncate", path=path, size=self.size(path)
                                     + self.rnd.randrange(-64 * BLOCK, 64 * BLOCK)))
            elif kind == "punch":
                steps.append(self.op("fallocate", path=path, mode=FALLOC_PUNCH_HOLE |
                                     FALLOC_KEEP_SIZE, off=self.rnd.randrange(100) * BLOCK,
                                     len=BLOCK * 4))
            elif kind == "chmod":
                steps.append(self.op("chmod", path=path, mode=0o600))
            elif kind == "setxattr":
                steps.append(self.op("setxattr", path=path, name="user.big", value="x"))
            elif kind == "fsync":
                steps.append(self.op("fsync", path=path, via="wo"))
            elif kind == "utime":
                steps.append(self.op("utime", path=path, mtime=LOWER_MTIME_NS + 7))
            else:
                steps.append(self.op("link", src=path, dst=f"big/{fid}.link"))
        return steps

    # ------------------------------------------------------------ the operations

    def gen_write(self):
        path = self.pick_file()
        nb = nblocks(self.size(path))
        idx = self.rnd.randrange(nb + 1) if nb < 16 or path.startswith("big/") or \
            self.m.paths[path] in BIG else self.rnd.randrange(nb)
        return [self.op("write", path=path, fid=self.m.paths[path], idx=idx)]

    def gen_overwrite(self):
        path = self.pick_file(0.05)
        first = self.op("truncate", path=path, size=0, via="otrunc")
        return self.then_written(first, path, self.m.paths[path], 1, 0.5)

    def gen_truncate(self):
        path = self.pick_file()
        size = self.size(path)
        if self.rnd.random() < 0.5 and size:
            new = self.rnd.randrange(max(0, size - 64 * BLOCK), size)
        else:
            new = size + self.rnd.randrange(1, 3 * BLOCK)
        if self.rnd.random() < 0.5:
            new -= new % BLOCK
        return [self.op("truncate", path=path, size=new)]

    def gen_fallocate(self):
        path = self.pick_file()
        size = self.size(path)
        mode = self.rnd.choice([0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE])
        if mode & FALLOC_PUNCH_HOLE and size:
            first = self.rnd.randrange(nblocks(size))
            return [self.op("fallocate", path=path, mode=mode, off=first * BLOCK,
                            len=BLOCK * self.rnd.randint(1, 4))]
        return [self.op("fallocate", path=path, mode=mode & FALLOC_KEEP_SIZE,
                        off=self.rnd.randrange(size + BLOCK), len=self.rnd.randint(1, 2 * BLOCK))]

    def gen_create(self):
        path = self.new_name("n")
        fid = f"n{self.n + 1}"
        return self.then_written(self.op("create", path=path, fid=fid), path, fid, 0, 0.7)

    def then_written(self, first, path, fid, min_writes, p_fsync):
        """`first`, then min_writes..3 block writes through the same fd, then an fsync with
        probability p_fsync."""
        steps = [first]
        for i in range(self.rnd.randint(min_writes, 3)):
            steps.append(self.op("write", path=path, fid=fid, idx=i, via="fd"))
        if self.rnd.random() < p_fsync:
            steps.append(self.op("fsync", path=path, via="fd"))
        return steps

    def gen_replace(self):
        """The atomic replace: a new file written and fsynced, renamed over the old one."""
        dst = self.pick("flp")
        tmp = self.new_name("tmp", os.path.dirname(dst))
        fid = f"tmp{self.n + 1}"
        steps = [self.op("create", path=tmp, fid=fid),
                 self.op("write", path=tmp, fid=fid, idx=0, via="fd"),
                 self.op("fsync", path=tmp, via="fd")]
        return steps + [self.op("rename", src=tmp, dst=dst)]

    def gen_unlink(self):
        return [self.op("unlink", path=self.pick("flp"))]

    def gen_mkdir(self):
        return [self.op("mkdir", path=self.new_name("dir"), fid=f"dir{self.n + 1}")]

    def gen_rmdir(self):
        """Empties a directory of a few entries (a lower one when there is one) and removes
        it: whiteouts, then an opaque-less removal of a merged directory."""
        small = [d for d in self.m.of_kind("d") if len(self.m.kids[d]) <= 4 and not any(
            self.m.obj(f"{d}/{k}").kind == "d" for k in self.m.kids[d])]
        if not small:
            return []
        lower = [d for d in small if self.m.paths[d].startswith("dir_")]
        d = self.rnd.choice(lower if lower and self.rnd.random() < 0.7 else small)
        steps = [self.op("unlink", path=f"{d}/{k}") for k in sorted(self.m.kids[d])]
        if self.m.paths[d].startswith("dir_"):
            self.removed_lower_dirs.add(d)
        return steps + [self.op("rmdir", path=d)]

    def gen_recreate(self):
        """mkdir where a lower directory was removed: the new one must be empty (opaque)."""
        gone = [d for d in self.removed_lower_dirs if d not in self.m.paths
                and os.path.dirname(d) in self.m.paths
                and self.m.obj(os.path.dirname(d)).kind == "d"]
        if not gone:
            return self.gen_rmdir()
        return [self.op("mkdir", path=self.rnd.choice(sorted(gone)), fid=f"re{self.n + 1}")]

    def gen_rename_over(self):
        src = self.pick("flp")
        dst = self.pick("flp", exclude=(src,))
        return [self.op("rename", src=src, dst=dst)] if dst else []

    def gen_rename_new(self):
        return [self.op("rename", src=self.pick("flp"), dst=self.new_name("r"))]

    def inside(self, path, top):
        return path == top or path.startswith(top + "/")

    def gen_rename_dir(self):
        dirs = self.m.of_kind("d")
        lower = [d for d in dirs if self.m.paths[d].startswith("dir_")]
        src = self.rnd.choice(lower if lower and self.rnd.random() < 0.7 else dirs)
        empty = [d for d in dirs if not self.m.kids[d] and not self.inside(d, src)
                 and not self.inside(src, d)]
        if empty and self.rnd.random() < 0.25:
            dst = self.rnd.choice(empty)
        else:
            parents = [d for d in dirs if d.count("/") < 3 and not self.inside(d, src)] + [""]
            dst = self.new_name("rd", self.rnd.choice(parents))
        return [self.op("rename", src=src, dst=dst)]

    def gen_exchange(self):
        a = self.pick("flp" if self.rnd.random() < 0.7 else "fd")
        b = self.pick("flp" if self.rnd.random() < 0.7 else "fd", exclude=(a,))
        if not b or self.inside(a, b) or self.inside(b, a):
            return []
        return [self.op("rename", src=a, dst=b, flags=RENAME_EXCHANGE)]

    def gen_noreplace(self):
        src = self.pick("flp")
        if self.rnd.random() < 0.5:
            return [self.op("rename", src=src, dst=self.new_name("nr"), flags=RENAME_NOREPLACE)]
        dst = self.pick("flpd", exclude=(src,))
        return [self.op("rename", src=src, dst=dst, flags=RENAME_NOREPLACE,
                        expect=errno.EEXIST)]

    def gen_link(self):
        src = self.pick_file(0.1)
        return [self.op("link", src=src, dst=self.new_name("h", os.path.dirname(src)))]

    def gen_symlink(self):
        return [self.op("symlink", path=self.new_name("sl"), fid=f"sl{self.n + 1}",
                        target=f"target-{self.n + 1}")]

    def gen_mkfifo(self):
        return [self.op("mkfifo", path=self.new_name("p"), fid=f"p{self.n + 1}")]

    def gen_setxattr(self):
        name = self.rnd.choice(["user.a", "user.b", "user.orig", "user.dir"])
        return [self.op("setxattr", path=self.pick("fd"), name=name, value=f"v{self.n + 1}")]

    def gen_removexattr(self):
        withx = [p for p in self.m.of_kind("fd") if self.m.obj(p).xattrs]
        if not withx:
            return self.gen_setxattr()
        path = self.rnd.choice(withx)
        name = self.rnd.choice(sorted(self.m.obj(path).xattrs))
        return [self.op("removexattr", path=path, name=name)]

    def gen_chmod(self):
        path = self.pick("fdp")
        modes = [0o700, 0o750, 0o755] if self.m.obj(path).kind == "d" else [0o600, 0o640,
                                                                            0o644, 0o755]
        return [self.op("chmod", path=path, mode=self.rnd.choice(modes))]

    def gen_chown(self):
        uid, gid = self.rnd.choice([(0, 0), (1000, 1000), (1, 2)])
        return [self.op("chown", path=self.pick("fdp"), uid=uid, gid=gid)]

    def gen_utime(self):
        return [self.op("utime", path=self.pick("fp"), mtime=LOWER_MTIME_NS + self.n * 1000)]

    def gen_fsync(self):
        return [self.op("fsync", path=self.pick_file(), via=self.rnd.choice(["ro", "wo"]))]

    def gen_fdatasync(self):
        return [self.op("fdatasync", path=self.pick_file(), via=self.rnd.choice(["ro", "wo"]))]

    def gen_syncfs(self):
        return [self.op("syncfs")]

    def gen_fsyncdir(self):
        return [self.op("fsyncdir", path=self.pick("d"))]

    def gen_fail_create(self):
        """O_CREAT|O_EXCL onto an existing name: EEXIST, and nothing changes."""
        return [self.op("create", path=self.pick("fdlp"), fid="none", expect=errno.EEXIST)]

    def gen_fail_rmdir(self):
        full = [d for d in self.m.of_kind("d") if self.m.kids[d]]
        if not full:
            return []
        return [self.op("rmdir", path=self.rnd.choice(full), expect=errno.ENOTEMPTY)]
