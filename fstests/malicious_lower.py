#!/usr/bin/env python3
"""Lower layers crafted by an attacker: the union must neither read nor modify anything
outside its layers, must keep answering, and must show what kernel overlayfs shows.

Why: container images are untrusted input. A layer is a directory tree anyone can build:
symlinks to / and to host files, `..` chains, hard links to host files, device nodes,
setuid files, fifos, sockets, names with newlines or invalid UTF-8, `.wh.` names, whiteout
devices, opaque markers and overlay xattrs (redirect, origin, metacopy) that point
elsewhere. The kernel resolves such layers inside the layer roots; a userspace daemon that
opens layer objects by path can be led out of them (a layer symlink followed by the daemon,
not by the caller) or can write through a hard link into a host file.

Each case builds a fresh tree: lower layers, an upper and a work directory, and an
"outside" directory next to them with sentinel files (a secret, a host directory, a file
that a lower hard-links). Through a fresh mount it runs probes (reads, writes, chmod,
chown, rename, unlink, readdir, readlink, copy-ups, as root and as uid 1000) in a child
with a watchdog, then walks the merged view (names, types, modes, owners, sizes, contents,
link targets, device numbers, xattr names; symlinks are never followed by the walk). A
target passes a case when
  (a) the outside directory (and /etc/passwd, /etc/hostname) and the lower layers are
      unchanged, byte for byte and in metadata (ctime included), and no probe that does not
      go through a symlink resolved by the caller returns a secret's content;
  (b) no probe hangs (a 25 s watchdog per case) and the mount still answers afterwards;
  (c) its probe results and merged view equal kernel overlayfs's (the kernel, mounted with
      redirect_dir=on,metacopy=on,index=on as stratafs behaves by default, is always run as
      the reference, also when it is not a reported target). Where the README documents
      that stratafs reads a layer differently by design (aufs `.wh.` whiteouts,
      user.overlay.* markers as root), the differences are printed as a NOTE instead.
The race case (a lower directory replaced by a symlink to a host directory while the mount
is live, then paths under it used through the mount) is undefined behaviour for overlayfs:
there only (a) and (b) decide, and each target's results are printed as a NOTE.

Usage: python3 fstests/malicious_lower.py [--binary PATH]
         [--targets stratafs,kernel,fuse-overlayfs] [--case SUBSTRING]... [-v]
Prints "PASS|FAIL TARGET: CASE[: why]" per case and target, and ends with
"malicious: N passed, M failed" for stratafs.
"""

import argparse
import errno
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SECRET = b"HOST-SECRET-" + os.urandom(8).hex().encode()
LINKED = b"host file hard-linked into a layer\n"
WATCHDOG = 25
HOST_FILES = ["/etc/passwd", "/etc/hostname"]
# The kernel as stratafs claims to be by default (README: directory renames write redirects,
# metadata-only copy-up, hard links kept one file): without them every directory rename would
# differ (EXDEV) and crafted redirect and metacopy xattrs would be judged by other rules.
KERNEL_OPTS = ",redirect_dir=on,metacopy=on,index=on"


# ---------------------------------------------------------------- results

def errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else str(e)


def digest(data):
    """What a probe reports for file content: "<SECRET>" when a sentinel leaked into it."""
    if SECRET in data:
        return "<SECRET>"
    if data and not data.strip(b"\0"):
        return f"<{len(data)} zero bytes>"
    return data.decode(errors="replace") if len(data) <= 64 else \
        "sha:" + hashlib.sha256(data).hexdigest()[:16]


def norm(v):
    if isinstance(v, bytes):
        return repr(v)[2:-1]
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    return v


def attempt(fn):
    try:
        v = fn()
        return "ok" if v is None else norm(v)
    except OSError as e:
        return errname(e)


# ---------------------------------------------------------------- filesystem helpers

def write(path, data=b"data", mode=0o644, uid=0, gid=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def read(path):
    with open(path, "rb") as f:
        return digest(f.read())


def append(path, data=b"+appended"):
    with open(path, "ab") as f:
        f.write(data)


def listdir(path):
    return sorted(os.listdir(path))


def kind(path):
    st = os.lstat(path)
    return [stat.filemode(st.st_mode), st.st_uid, st.st_gid]


def as_uid(uid, fn):
    """fn() run by uid:uid without supplementary groups, in a child; its result or errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            res = attempt(fn)
        except Exception as e:  # noqa: BLE001 - reported as the probe's result
            res = type(e).__name__
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data or b'"no result"')


def walk(top):
    """The merged view below `top`, without following symlinks: one entry per object."""
    out, top = [], os.fsencode(top)

    def visit(rel):
        for name in sorted(os.listdir(os.path.join(top, rel) if rel else top)):
            r = os.path.join(rel, name) if rel else name
            full = os.path.join(top, r)
            try:
                st = os.lstat(full)
            except OSError as e:
                out.append([norm(r), errname(e)])
                continue
            e = [norm(r), stat.filemode(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                e += [st.st_size, attempt(lambda: read(full))]
            elif stat.S_ISLNK(st.st_mode):
                e.append(norm(os.readlink(full)))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e.append([os.major(st.st_rdev), os.minor(st.st_rdev)])
            e.append(attempt(lambda: sorted(os.listxattr(full, follow_symlinks=False))))
            out.append(e)
            if stat.S_ISDIR(st.st_mode):
                visit(r)
    visit(b"")
    return out


def snapshot(paths):
    """Contents and metadata (ctime included, atime not) of every object below `paths`."""
    snap = {}
    for top in paths:
        if os.path.isfile(top):
            items = [(top, os.lstat(top))]
        else:
            items = []
            for d, dirs, files in os.walk(top.encode()):
                for n in [b""] + dirs + files:
                    p = os.path.join(d, n) if n else d
                    items.append((p, os.lstat(p)))
        for p, st in items:
            e = [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns,
                 st.st_ctime_ns, st.st_rdev]
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    e.append(hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                e.append(norm(os.readlink(p)))
            if not stat.S_ISLNK(st.st_mode):
                e.append(sorted((norm(x), norm(os.getxattr(p, x))) for x in os.listxattr(p)))
            snap[norm(p)] = e
    return snap


def changed(before, after):
    """What differs between two snapshots: "created PATH", "removed PATH", "changed PATH"."""
    keys = sorted(set(before) | set(after))
    return [("created " if k not in before else "removed " if k not in after else "changed ") + k
            for k in keys if before.get(k) != after.get(k)]


# ---------------------------------------------------------------- the tree of one case

class Tree:
    """lowers l0 (top) .. lN, upper, work, merged, and `out`: the host outside the layers."""

    def __init__(self, scratch, nlowers):
        self.dir = tempfile.mkdtemp(dir=scratch)
        os.chmod(self.dir, 0o755)
        self.lowers = [os.path.join(self.dir, f"l{i}") for i in range(nlowers)]
        self.upper, self.work, self.merged, self.out = (
            os.path.join(self.dir, x) for x in ("u", "w", "m", "out"))
        for x in self.lowers + [self.upper, self.work, self.merged]:
            os.makedirs(x)
        write(f"{self.out}/secret", SECRET + b" file\n")
        write(f"{self.out}/hostdir/secret", SECRET + b" in hostdir\n")
        write(f"{self.out}/hostdir/sub/f", SECRET + b" in hostdir/sub\n")
        write(f"{self.out}/hostdir/g", SECRET + b" g\n", mode=0o666)
        write(f"{self.out}/linked", LINKED, mode=0o666)
        os.chmod(self.out, 0o755)

    def l(self, i, rel=""):
        return os.path.join(self.lowers[i], rel)

    def m(self, rel=""):
        return os.path.join(self.merged, rel)

    def up(self, depth=12):
        """A `..` chain from anywhere in the tree up to /."""
        return "../" * depth

    def guarded(self):
        return [self.out] + [p for p in HOST_FILES if os.path.exists(p)]


def mount(target, binary, t):
    opts = f"lowerdir={':'.join(t.lowers)},upperdir={t.upper},workdir={t.work}"
    if target == "kernel":
        cmd = ["mount", "-t", "overlay", "overlay", "-o", opts + KERNEL_OPTS, t.merged]
    elif target == "fuse-overlayfs":
        cmd = ["fuse-overlayfs", "-o", opts, t.merged]
    else:
        cmd = [binary, "-o", opts, t.merged]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise OSError(f"mount failed: {r.stderr.strip()[-300:]}")


def unmount(t, fuse_dev):
    """umount; a hung FUSE connection is aborted first so that nothing stays blocked."""
    if fuse_dev is not None and os.path.exists(f"/sys/fs/fuse/connections/{fuse_dev}/abort"):
        try:
            with open(f"/sys/fs/fuse/connections/{fuse_dev}/abort", "w") as f:
                f.write("1")
        except OSError:
            pass
    for cmd in (["umount", t.merged], ["umount", "-l", t.merged]):
        if common.is_mounted(t.merged):
            subprocess.run(cmd, capture_output=True, timeout=30)


def run_probes(probes, t, seconds):
    """Runs each (label, fn(t)) in one child with a watchdog; returns (results, hung_at)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for label, fn in probes:
            os.write(w, json.dumps([label, None]).encode() + b"\n")
            try:
                res = attempt(lambda: fn(t))
            except Exception as e:  # noqa: BLE001 - a probe's bug is its result
                res = f"{type(e).__name__}: {e}"
            os.write(w, json.dumps([label, res]).encode() + b"\n")
        os._exit(0)
    os.close(w)
    buf, deadline = b"", time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        ready = select.select([r], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(r, 1 << 20)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    os.waitpid(pid, 0)
    results, pending = [], None
    for line in buf.decode().splitlines():
        label, res = json.loads(line)
        if res is None:
            pending = label
        else:
            results.append([label, res])
            pending = None
    return results, pending


def alive(t):
    res, hung = run_probes([("alive", lambda t: listdir(t.m()) and None)], t, 10)
    return hung is None and res and res[0][1] == "ok"


def setx(path, name, value):
    os.setxattr(path, name, value, follow_symlinks=False)


# ---------------------------------------------------------------- the cases
# Each case: fill(t) builds the layers; probes is a list of (label, fn(t)); leak_ok names
# probes that go through a symlink the caller resolves (reaching the host is then normal).

CASES = {}


def case(name, nlowers=1, leak_ok=(), compare=True, documented=None):
    """`documented`: the README documents that stratafs reads this layer differently from the
    kernel (by design); differences are then printed as a NOTE and only (a) and (b) decide."""
    def reg(fn):
        CASES[name] = dict(make=fn, nlowers=nlowers, leak_ok=set(leak_ok), compare=compare,
                           documented=documented)
        return fn
    return reg


@case("symlinks out of the layers", leak_ok=("read host", "read ..chain", "list etc"))
def symlinks(t):
    os.symlink("/", t.l(0, "root"))
    os.symlink("/etc", t.l(0, "etc"))
    os.symlink(f"{t.out}/secret", t.l(0, "host"))
    os.symlink(t.up() + t.out.lstrip("/") + "/secret", t.l(0, "chain"))
    os.symlink("..", t.l(0, "dotdot"))
    os.symlink("loop", t.l(0, "loop"))
    os.makedirs(t.l(0, "dir"))
    os.symlink("../../../..", t.l(0, "dir/esc"))
    os.symlink(f"{t.out}/hostdir", t.l(0, "dir/hd"))
    return [
        ("readlinks", lambda t: [os.readlink(t.m(x)) for x in
                                 ("root", "etc", "host", "chain", "dotdot", "dir/esc")]),
        ("read host", lambda t: read(t.m("host"))),
        ("read ..chain", lambda t: read(t.m("chain"))),
        ("list etc", lambda t: "passwd" in os.listdir(t.m("etc"))),
        ("stat loop", lambda t: os.stat(t.m("loop")) and None),
        ("list dir/hd/ as the daemon sees it", lambda t: kind(t.m("dir/hd"))),
        ("lchown dir/esc (copy-up)", lambda t: os.lchown(t.m("dir/esc"), 1000, 1000)),
        ("lsetxattr host (copy-up)",
         lambda t: os.setxattr(t.m("host"), "trusted.x", b"1", follow_symlinks=False)),
        ("readlink after copy-up", lambda t: [os.readlink(t.m("dir/esc")),
                                              os.readlink(t.m("host"))]),
        ("rename host", lambda t: os.rename(t.m("host"), t.m("host2"))),
        ("unlink etc", lambda t: os.unlink(t.m("etc"))),
        ("rename dir (with symlinks)", lambda t: os.rename(t.m("dir"), t.m("dir2"))),
        ("new absolute symlink", lambda t: os.symlink("/etc/passwd", t.m("p"))),
    ]


@case("directory over a symlink below", nlowers=2)
def dir_over_symlink(t):
    write(t.l(0, "d/own"), b"own")
    os.symlink(f"{t.out}/hostdir", t.l(1, "d"))
    write(t.l(0, "f/g/own2"), b"own2")
    os.makedirs(t.l(1, "f"))
    os.symlink(f"{t.out}/hostdir", t.l(1, "f/g"))
    os.symlink(f"{t.out}/hostdir", t.l(0, "s"))
    os.makedirs(t.l(1, "s"))
    write(t.l(1, "s/x"), b"x")
    return [
        ("list d", lambda t: listdir(t.m("d"))),
        ("read d/secret", lambda t: read(t.m("d/secret"))),
        ("read d/sub/f", lambda t: read(t.m("d/sub/f"))),
        ("list f/g", lambda t: listdir(t.m("f/g"))),
        ("readlink s", lambda t: os.readlink(t.m("s"))),
        ("create d/new", lambda t: write(t.m("d/new"), b"new")),
        ("chmod d (copy-up)", lambda t: os.chmod(t.m("d"), 0o700)),
        ("append d/own", lambda t: append(t.m("d/own"))),
        ("unlink d/own", lambda t: os.unlink(t.m("d/own"))),
        ("rename f/g", lambda t: os.rename(t.m("f/g"), t.m("f/h"))),
        ("rmdir f/h", lambda t: os.rmdir(t.m("f/h"))),
        ("list d after", lambda t: listdir(t.m("d"))),
    ]


@case("hard link to a host file", leak_ok=())
def hard_link(t):
    os.link(f"{t.out}/linked", t.l(0, "hl"))
    os.makedirs(t.l(0, "sub"))
    os.link(f"{t.out}/linked", t.l(0, "sub/hl"))
    return [
        ("read hl", lambda t: read(t.m("hl"))),
        ("append hl as uid 1000", lambda t: as_uid(1000, lambda: append(t.m("hl")))),
        ("append hl", lambda t: append(t.m("hl"))),
        ("read hl after", lambda t: read(t.m("hl"))),
        ("chmod sub/hl", lambda t: os.chmod(t.m("sub/hl"), 0o600)),
        ("truncate sub/hl", lambda t: os.truncate(t.m("sub/hl"), 3)),
        ("utime sub/hl", lambda t: os.utime(t.m("sub/hl"), (1, 1))),
        ("rename hl", lambda t: os.rename(t.m("hl"), t.m("hl3"))),
        ("unlink hl3", lambda t: os.unlink(t.m("hl3"))),
    ]


@case("device nodes")
def devices(t):
    os.mknod(t.l(0, "mem"), 0o666 | stat.S_IFCHR, os.makedev(1, 1))
    os.mknod(t.l(0, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(t.l(0, "disk"), 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.makedirs(t.l(0, "dev"))
    os.mknod(t.l(0, "dev/kmsg"), 0o644 | stat.S_IFCHR, os.makedev(1, 11))
    return [
        ("lstat", lambda t: [kind(t.m(x)) for x in ("mem", "null", "disk", "dev/kmsg")]),
        ("chmod mem (copy-up)", lambda t: os.chmod(t.m("mem"), 0o600)),
        ("lchown disk (copy-up)", lambda t: os.lchown(t.m("disk"), 1000, 1000)),
        ("rename null", lambda t: os.rename(t.m("null"), t.m("null2"))),
        ("rename dev", lambda t: os.rename(t.m("dev"), t.m("dev2"))),
        ("unlink disk", lambda t: os.unlink(t.m("disk"))),
        ("write mem as uid 1000", lambda t: as_uid(1000, lambda: append(t.m("mem")))),
    ]


@case("setuid and setgid objects")
def setid(t):
    write(t.l(0, "suid"), b"#!/bin/sh\nid\n", mode=0o6777)
    write(t.l(0, "suid-chown"), b"#!/bin/sh\n", mode=0o6755)
    write(t.l(0, "sgid-noexec"), b"x", mode=0o2666)
    os.makedirs(t.l(0, "sgd"))
    os.chown(t.l(0, "sgd"), 0, 2000)
    os.chmod(t.l(0, "sgd"), 0o2777)
    return [
        ("modes", lambda t: [kind(t.m(x)) for x in ("suid", "suid-chown", "sgid-noexec", "sgd")]),
        ("append suid as uid 1000", lambda t: as_uid(1000, lambda: append(t.m("suid")))),
        ("mode of suid after", lambda t: kind(t.m("suid"))),
        ("chown suid-chown", lambda t: os.chown(t.m("suid-chown"), 1000, 1000)),
        ("mode of suid-chown after", lambda t: kind(t.m("suid-chown"))),
        ("truncate sgid-noexec as uid 1000",
         lambda t: as_uid(1000, lambda: os.truncate(t.m("sgid-noexec"), 0))),
        ("create in setgid dir as uid 1000",
         lambda t: as_uid(1000, lambda: open_close(t.m("sgd/new"), os.O_CREAT | os.O_WRONLY)
                          or kind(t.m("sgd/new")))),
        ("mkdir in setgid dir as uid 1000",
         lambda t: as_uid(1000, lambda: os.mkdir(t.m("sgd/nd"), 0o755) or kind(t.m("sgd/nd")))),
    ]


def bind_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()


def connect(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()


def open_close(path, flags):
    os.close(os.open(path, flags))


@case("fifos and sockets")
def fifos(t):
    os.mkfifo(t.l(0, "fifo"), 0o666)
    bind_socket(t.l(0, "sock"))
    return [
        ("lstat", lambda t: [kind(t.m("fifo")), kind(t.m("sock"))]),
        ("open fifo O_RDONLY|O_NONBLOCK",
         lambda t: open_close(t.m("fifo"), os.O_RDONLY | os.O_NONBLOCK)),
        ("open fifo O_WRONLY|O_NONBLOCK",
         lambda t: open_close(t.m("fifo"), os.O_WRONLY | os.O_NONBLOCK)),
        ("connect sock", lambda t: connect(t.m("sock"))),
        ("chmod fifo (copy-up)", lambda t: os.chmod(t.m("fifo"), 0o600)),
        ("chmod sock (copy-up)", lambda t: os.chmod(t.m("sock"), 0o600)),
        ("connect sock after copy-up", lambda t: connect(t.m("sock"))),
        ("rename sock", lambda t: os.rename(t.m("sock"), t.m("sock2"))),
        ("unlink fifo", lambda t: os.unlink(t.m("fifo"))),
        ("mkfifo", lambda t: os.mkfifo(t.m("fifo2"))),
        ("bind a new socket", lambda t: bind_socket(t.m("sock3"))),
    ]


NAMES = [b"new\nline", b"bad-\xff\xfe-utf8", b"...", b".. ", b" ..", b"..\n", b"-rf",
         b"a\\b", b"x" * 255, b".\t", b"\xc3("]


@case("names: newlines, invalid UTF-8, dot look-alikes")
def names(t):
    for n in NAMES:
        write(os.path.join(t.l(0).encode(), n), n)
    os.makedirs(os.path.join(t.l(0).encode(), b"dir\n\xff"))
    write(os.path.join(t.l(0).encode(), b"dir\n\xff", b".."+b"\n"), b"inner")
    mb = t.m().encode()
    return [
        ("list", lambda t: sorted(os.listdir(mb))),
        ("read each", lambda t: [attempt(lambda n=n: read(os.path.join(mb, n))) for n in NAMES]),
        ("rename newline name", lambda t: os.rename(os.path.join(mb, b"new\nline"),
                                                    os.path.join(mb, b"new\nline2\xff"))),
        ("unlink ...", lambda t: os.unlink(os.path.join(mb, b"..."))),
        ("chmod long name", lambda t: os.chmod(os.path.join(mb, b"x" * 255), 0o600)),
        ("append invalid utf-8", lambda t: append(os.path.join(mb, b"bad-\xff\xfe-utf8"))),
        ("mkdir invalid utf-8", lambda t: os.mkdir(os.path.join(mb, b"\xff\xfe"))),
        ("create ..\\n..", lambda t: write(os.path.join(mb, b"..\n.."), b"new")),
        ("rename dir with newline", lambda t: os.rename(os.path.join(mb, b"dir\n\xff"),
                                                        os.path.join(mb, b"d\n2"))),
        ("read inner", lambda t: read(os.path.join(mb, b"d\n2", b"..\n"))),
        ("256-byte name", lambda t: write(os.path.join(mb, b"y" * 256))),
    ]


@case("whiteouts: 0/0 devices in a lower layer", nlowers=2)
def whiteouts(t):
    os.mknod(t.l(0, "bar"), 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.makedirs(t.l(0, "wd"))
    os.mknod(t.l(0, "wd/chr00"), 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(t.l(0, "wd/gone"), 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(t.l(1, "lonely"), 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    for rel in ("bar", "baz", "wd/x", "wd/chr00"):
        write(t.l(1, rel), rel.encode())
    return [
        ("list /", lambda t: listdir(t.m())),
        ("list wd", lambda t: listdir(t.m("wd"))),
        ("lstat bar", lambda t: kind(t.m("bar"))),
        ("lstat lonely", lambda t: kind(t.m("lonely"))),
        ("create bar", lambda t: write(t.m("bar"), b"new bar")),
        ("read bar", lambda t: read(t.m("bar"))),
        ("mknod 0/0 through the mount",
         lambda t: os.mknod(t.m("w00"), 0o600 | stat.S_IFCHR, os.makedev(0, 0))),
        ("lstat w00", lambda t: kind(t.m("w00"))),
        ("rmdir wd after emptying", lambda t: [attempt(lambda: os.unlink(t.m("wd/x"))),
                                              attempt(lambda: os.rmdir(t.m("wd")))]),
        ("mkdir wd again", lambda t: os.mkdir(t.m("wd")) or listdir(t.m("wd"))),
    ]


@case("foreign markers: .wh. names, .wh..wh..opq, user.overlay.opaque", nlowers=2,
      documented="README, Status: stratafs reads every whiteout format (.wh.NAME) and opaque "
                 "marker (.wh..wh..opq, user.overlay.opaque), the kernel as root only its own")
def foreign_markers(t):
    write(t.l(0, ".wh.foo"), b"aufs whiteout")
    write(t.l(0, ".wh..wh..opq"), b"")
    write(t.l(0, "od/.wh..wh..opq"), b"")
    write(t.l(0, "wd/.wh.x"), b"")
    write(t.l(0, "ud/own"), b"own")
    setx(t.l(0, "ud"), "user.overlay.opaque", b"y")
    for rel in ("foo", "baz", "od/inner", "wd/x", "ud/below"):
        write(t.l(1, rel), rel.encode())
    return [
        ("list /", lambda t: listdir(t.m())),
        ("list od, wd, ud", lambda t: [listdir(t.m(d)) for d in ("od", "wd", "ud")]),
        ("read foo", lambda t: read(t.m("foo"))),
        ("read .wh.foo", lambda t: read(t.m(".wh.foo"))),
        ("create .wh.new", lambda t: write(t.m(".wh.new"))),
        ("create .wh.baz", lambda t: write(t.m(".wh.baz"))),
        ("list / after .wh.baz", lambda t: listdir(t.m())),
        ("unlink .wh.foo", lambda t: os.unlink(t.m(".wh.foo"))),
        ("append foo", lambda t: append(t.m("foo"))),
        ("get user.overlay.opaque", lambda t: os.getxattr(t.m("ud"), "user.overlay.opaque")),
        ("rename ud", lambda t: os.rename(t.m("ud"), t.m("ud2"))),
    ]


@case("opaque markers", nlowers=2)
def opaque(t):
    for d in ("td", "gd", "nd"):
        write(t.l(1, f"{d}/below"), b"below")
        write(t.l(0, f"{d}/own"), b"own")
    setx(t.l(0, "td"), "trusted.overlay.opaque", b"y")
    setx(t.l(0, "gd"), "trusted.overlay.opaque", b"\xff" * 300)
    write(t.l(0, "tf"), b"file")
    setx(t.l(0, "tf"), "trusted.overlay.opaque", b"y")
    write(t.l(1, "tf"), b"below file")
    setx(t.l(1, "nd"), "trusted.overlay.opaque", b"y")
    return [
        ("list", lambda t: [listdir(t.m(d)) for d in ("td", "gd", "nd")]),
        ("read tf", lambda t: read(t.m("tf"))),
        ("get trusted.overlay.opaque", lambda t: os.getxattr(t.m("td"), "trusted.overlay.opaque")),
        ("create td/new", lambda t: write(t.m("td/new"))),
        ("chmod gd (copy-up)", lambda t: os.chmod(t.m("gd"), 0o700)),
        ("list gd after", lambda t: listdir(t.m("gd"))),
        ("rename td", lambda t: os.rename(t.m("td"), t.m("td2"))),
        ("list td2", lambda t: listdir(t.m("td2"))),
        ("list nd", lambda t: listdir(t.m("nd"))),
    ]


@case("redirect and origin xattrs pointing elsewhere", nlowers=2)
def redirects(t):
    outrel = t.out.lstrip("/")
    for d, target in (("r_abs", "/../../../../../../../../../" + outrel + "/hostdir"),
                      ("r_rel", "../hostdir"), ("r_etc", "/etc"), ("r_ok", "/target"),
                      ("r_host", t.out + "/hostdir")):
        write(t.l(0, f"{d}/own"), b"own")
        setx(t.l(0, d), "trusted.overlay.redirect", target.encode())
    write(t.l(1, "target/t"), b"redirect target")
    write(t.l(1, "etc/passwd"), b"layer passwd")
    write(t.l(0, "og/own"), b"own")
    setx(t.l(0, "og"), "trusted.overlay.origin", os.urandom(40))
    write(t.l(0, "ogf"), b"origin file")
    setx(t.l(0, "ogf"), "trusted.overlay.origin", b"\x00\xfb" + os.urandom(30))
    dirs = ("r_abs", "r_rel", "r_etc", "r_ok", "r_host", "og")
    return [
        ("list dirs", lambda t: [attempt(lambda d=d: listdir(t.m(d))) for d in dirs]),
        ("read r_abs/secret", lambda t: read(t.m("r_abs/secret"))),
        ("read r_host/sub/f", lambda t: read(t.m("r_host/sub/f"))),
        ("read r_etc/passwd", lambda t: read(t.m("r_etc/passwd"))),
        ("create r_abs/new", lambda t: write(t.m("r_abs/new"))),
        ("chmod r_host (copy-up)", lambda t: os.chmod(t.m("r_host"), 0o700)),
        ("rename r_ok", lambda t: os.rename(t.m("r_ok"), t.m("r_ok2"))),
        ("read ogf", lambda t: read(t.m("ogf"))),
        ("append ogf (copy-up)", lambda t: append(t.m("ogf"))),
        ("rename og", lambda t: os.rename(t.m("og"), t.m("og2"))),
    ]


@case("metacopy files in a lower layer, redirected elsewhere", nlowers=2)
def metacopy(t):
    """A metacopy stub takes its data from the layers below (from its redirect's path
    there): the layer root bounds it, a host path or a `..` chain must find nothing."""
    outrel = t.out.lstrip("/")
    # Each stub has the size of the data it resolves to, as a copy-up writes it. (A stub whose
    # size disagrees with its data is an inconsistent layer: the kernel then shows the stub's
    # size but ends reads at the data's end, stratafs copies the data up padded to the size.)
    sizes = {"mc_etc": len(b"layer passwd"), "mc": len(b"lower data of mc\n")}
    for f, target in (("mc_abs", "/../../../../../../../../../" + outrel + "/secret"),
                      ("mc_host", t.out + "/secret"), ("mc_etc", "/etc/passwd"), ("mc", None)):
        write(t.l(0, f), b"")
        os.truncate(t.l(0, f), sizes.get(f, len(SECRET) + 6))
        setx(t.l(0, f), "trusted.overlay.metacopy", b"")
        if target:
            setx(t.l(0, f), "trusted.overlay.redirect", target.encode())
    write(t.l(1, "mc"), b"lower data of mc\n")
    write(t.l(1, "etc/passwd"), b"layer passwd")
    files = ("mc_abs", "mc_host", "mc_etc", "mc")
    return [
        ("read files", lambda t: [attempt(lambda f=f: read(t.m(f))) for f in files]),
        ("append mc_abs (data copy-up)", lambda t: append(t.m("mc_abs"))),
        ("append mc_host (data copy-up)", lambda t: append(t.m("mc_host"))),
        ("chmod mc_etc (metadata copy-up)", lambda t: os.chmod(t.m("mc_etc"), 0o600)),
        ("append mc (data copy-up)", lambda t: append(t.m("mc"))),
        ("read after", lambda t: [attempt(lambda f=f: read(t.m(f))) for f in files]),
    ]


def swap_for_symlink(t):
    """The race: the lower directory d becomes a symlink to the host's hostdir."""
    os.rename(t.l(0, "d"), t.l(0, "d.old"))
    os.symlink(f"{t.out}/hostdir", t.l(0, "d"))


@case("race: lower directory swapped for a symlink to a host dir", compare=False)
def race(t):
    write(t.l(0, "d/sub/f"), b"lower f")
    write(t.l(0, "d/g"), b"lower g", mode=0o666)
    write(t.l(0, "d/secret"), b"lower secret")
    return [
        ("list d before", lambda t: listdir(t.m("d"))),
        ("list d/sub before", lambda t: listdir(t.m("d/sub"))),
        ("stat d/secret before", lambda t: kind(t.m("d/secret"))),
        ("swap the lower d for a symlink", swap_for_symlink),
        ("list d", lambda t: listdir(t.m("d"))),
        ("read d/secret", lambda t: read(t.m("d/secret"))),
        ("read d/sub/f", lambda t: read(t.m("d/sub/f"))),
        ("read d/g", lambda t: read(t.m("d/g"))),
        ("append d/g", lambda t: append(t.m("d/g"))),
        ("append d/sub/f", lambda t: append(t.m("d/sub/f"))),
        ("chmod d/secret", lambda t: os.chmod(t.m("d/secret"), 0o600)),
        ("create d/new", lambda t: write(t.m("d/new"))),
        ("unlink d/secret", lambda t: os.unlink(t.m("d/secret"))),
        ("rename d/sub", lambda t: os.rename(t.m("d/sub"), t.m("d/sub2"))),
        ("list d after", lambda t: listdir(t.m("d"))),
    ]


# ---------------------------------------------------------------- running

def run_case(name, target, binary, scratch):
    """Returns (safe, why, observation): safety per (a) and (b); the observation is the probe
    results and the merged view, for comparison with the kernel."""
    c = CASES[name]
    t = Tree(scratch, c["nlowers"])
    fuse_dev = None
    try:
        probes = c["make"](t)
        guarded = snapshot(t.guarded())
        if c["compare"]:
            layers = snapshot(t.lowers)
        mount(target, binary, t)
        if target != "kernel":
            fuse_dev = os.minor(os.stat(t.merged).st_dev)
        probes = probes + [("merged view", lambda t: walk(t.m()))]
        results, hung = run_probes(probes, t, WATCHDOG)
        # The tree's own path differs between runs: compare what is below it.
        results = json.loads(json.dumps(results).replace(t.dir, "$TREE"))
        why = []
        if hung:
            why.append(f"hung for {WATCHDOG} s at probe {hung!r}")
        elif not alive(t):
            why.append("the mount no longer answers after the probes")
        unmount(t, fuse_dev if hung else None)
        bad = changed(guarded, snapshot(t.guarded()))
        if bad:
            why.append("host files outside the layers changed: "
                       + ", ".join(bad[:5]).replace(t.dir, "$TREE"))
        if c["compare"]:
            bad = changed(layers, snapshot(t.lowers))
            if bad:
                why.append("the lower layer changed: "
                           + ", ".join(bad[:5]).replace(t.dir, "$TREE"))
        leaks = [label for label, res in results
                 if label not in c["leak_ok"] and "<SECRET>" in json.dumps(res)]
        if leaks:
            why.append(f"a host secret was exposed by {leaks}")
        return not why, "; ".join(why), results
    finally:
        unmount(t, fuse_dev)
        common.unmount_all_under(t.dir)
        shutil.rmtree(t.dir, ignore_errors=True)


def differences(ours, ref, limit=3):
    """Labels whose results differ between two observations, with both results, shortened."""
    a, b = dict(ours), dict(ref)
    out = []
    for label in list(b) + [x for x in a if x not in b]:
        if a.get(label) != b.get(label):
            if label == "merged view":
                va = {json.dumps(e[0]): e for e in a.get(label) or []}
                vb = {json.dumps(e[0]): e for e in b.get(label) or []}
                ks = [k for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
                detail = "; ".join(f"{va.get(k)} vs kernel {vb.get(k)}" for k in ks[:3])
                out.append(f"[merged view] {detail}")
            else:
                out.append(f"[{label}] {a.get(label, 'not run')} vs kernel "
                           f"{b.get(label, 'not run')}")
    return [s if len(s) < 400 else s[:400] + "..." for s in out[:limit]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--targets", default="stratafs,kernel,fuse-overlayfs")
    ap.add_argument("--case", action="append", default=[],
                    help="run the cases whose name contains this (repeatable; default all)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every observation")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("malicious: run as root")
    binary = os.path.abspath(args.binary)
    targets = [x for x in args.targets.split(",")
               if x != "fuse-overlayfs" or shutil.which("fuse-overlayfs")]
    names = [n for n in CASES if not args.case or any(c in n for c in args.case)]
    common.enter_private_mount_namespace()
    scratch = tempfile.mkdtemp(prefix="stratafs-malicious-", dir="/var/tmp")
    os.chmod(scratch, 0o755)
    counts = [0, 0]
    started = time.monotonic()
    try:
        for name in names:
            runs = {}
            for target in ["kernel"] + [x for x in targets if x != "kernel"]:
                try:
                    runs[target] = run_case(name, target, binary, scratch)
                except (OSError, subprocess.SubprocessError) as e:
                    runs[target] = (False, f"{type(e).__name__}: {e}", [])
            for target in targets:
                safe, why, obs = runs[target]
                reasons = [why] if why else []
                if CASES[name]["compare"] and target != "kernel" and runs["kernel"][2]:
                    diff = differences(obs, runs["kernel"][2])
                    if diff and CASES[name]["documented"]:
                        print(f"NOTE {target}: {name}: differs from kernel overlayfs as "
                              f"documented ({CASES[name]['documented']}): " + " | ".join(diff))
                    elif diff:
                        reasons.append("differs from kernel overlayfs: " + " | ".join(diff))
                ok = not reasons
                print(f"{'PASS' if ok else 'FAIL'} {target}: {name}"
                      + ("" if ok else ": " + "; ".join(reasons)), flush=True)
                if target == "stratafs":
                    counts[0 if ok else 1] += 1
                if args.verbose or not CASES[name]["compare"]:
                    shown = [r for r in obs if r[0] != "merged view"] if not args.verbose \
                        else obs
                    print(f"NOTE {target}: {name}: {json.dumps(shown)}", flush=True)
    finally:
        common.unmount_all_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"({time.monotonic() - started:.1f} s)")
    print(f"malicious: {counts[0]} passed, {counts[1]} failed")
    return 0 if counts[1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
