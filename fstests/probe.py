#!/usr/bin/env python3
"""Small system-call probes for fstests scenarios, printing results as stable text so that the
same probe run on kernel overlayfs and on stratafs can be compared line by line.

Why: shell tools hide errnos behind messages and cannot call telldir/seekdir, readdir with
unlinks in between, or SEEK_DATA; these probes make such behaviour visible.

Usage: probe.py errno OP PATH [ARG]      one call, prints "OP PATH: OK" or "OP PATH: ENAME"
       probe.py seek DIR                 telldir/seekdir round trips over a whole directory
       probe.py interleave DIR N         read N entries, unlink every entry, read the rest
       probe.py dots DIR                 d_ino of "." and ".." equal st_ino of DIR and DIR/..
       probe.py stable PATH...           st_ino unchanged across dropping the kernel caches
       probe.py statfs MNT REF           statfs of MNT shows the filesystem of REF
       probe.py holes FILE               SEEK_DATA/SEEK_HOLE map of a file
       probe.py mmap FILE                content read through mmap equals read(2)
"""

import ctypes
import errno
import hashlib
import mmap
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)


class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.readdir.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.telldir.argtypes = [ctypes.c_void_p]
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
libc.closedir.argtypes = [ctypes.c_void_p]


def err_name(e):
    return errno.errorcode.get(e, str(e))


def _opendir(path):
    d = libc.opendir(os.fsencode(path))
    if not d:
        raise OSError(ctypes.get_errno(), "opendir")
    return d


def _next(d):
    """(name, d_ino) of the next entry, or None at the end."""
    ent = libc.readdir(d)
    if not ent:
        return None
    return (ent.contents.d_name.decode(errors="replace"), ent.contents.d_ino)


def _read_names(d, count):
    """The names of the next `count` entries of stream `d` (fewer at its end)."""
    names = []
    for _ in range(count):
        ent = _next(d)
        if ent is None:
            break
        names.append(ent[0])
    return names


def _open_close(path, flags):
    os.close(os.open(path, flags, 0o644))


CALLS = {
    "stat": lambda p, a: os.stat(p),
    "lstat": lambda p, a: os.lstat(p),
    "open_r": lambda p, a: _open_close(p, os.O_RDONLY),
    "open_w": lambda p, a: _open_close(p, os.O_WRONLY),
    "open_rw": lambda p, a: _open_close(p, os.O_RDWR),
    "open_trunc": lambda p, a: _open_close(p, os.O_WRONLY | os.O_TRUNC),
    "create": lambda p, a: _open_close(p, os.O_WRONLY | os.O_CREAT),
    "create_excl": lambda p, a: _open_close(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    "open_dir": lambda p, a: _open_close(p, os.O_RDONLY | os.O_DIRECTORY),
    "opendir": lambda p, a: libc.closedir(_opendir(p)),
    "readlink": lambda p, a: os.readlink(p),
    "listxattr": lambda p, a: os.listxattr(p, follow_symlinks=False),
    "getxattr": lambda p, a: os.getxattr(p, a, follow_symlinks=False),
    "setxattr": lambda p, a: os.setxattr(p, a or "user.probe", b"v", follow_symlinks=False),
    "removexattr": lambda p, a: os.removexattr(p, a or "user.probe", follow_symlinks=False),
    "access_r": lambda p, a: _access(p, os.R_OK),
    "access_w": lambda p, a: _access(p, os.W_OK),
    "access_x": lambda p, a: _access(p, os.X_OK),
    "mkdir": lambda p, a: os.mkdir(p),
    "rmdir": lambda p, a: os.rmdir(p),
    "unlink": lambda p, a: os.unlink(p),
    "rename": lambda p, a: os.rename(p, a),
    "link": lambda p, a: os.link(p, a),
    "symlink": lambda p, a: os.symlink("target", p),
    "mknod": lambda p, a: os.mknod(p, 0o644 | 0o010000),
    "chmod": lambda p, a: os.chmod(p, 0o600, follow_symlinks=False),
    "chown": lambda p, a: os.chown(p, 1, 1, follow_symlinks=False),
    "truncate": lambda p, a: os.truncate(p, 0),
    "utime": lambda p, a: os.utime(p, (1, 1), follow_symlinks=False),
    "read": lambda p, a: _read_all(p),
    "listdir": lambda p, a: os.listdir(p),
}


def _access(p, mode):
    if not os.access(p, mode):
        raise OSError(ctypes.get_errno() or errno.EACCES, "access")


def _read_all(p):
    with open(p, "rb") as f:
        f.read()


def cmd_errno(op, path, arg=None):
    try:
        CALLS[op](path, arg)
        print(f"{op} {path}: OK")
    except OSError as e:
        print(f"{op} {path}: {err_name(e.errno)}")


def cmd_seek(path):
    """Every position telldir gave must, after seekdir, continue with the same entries."""
    d = _opendir(path)
    entries = []
    while True:
        pos = libc.telldir(d)
        ent = _next(d)
        if ent is None:
            break
        entries.append((pos, ent[0]))
    names = [n for _, n in entries]
    bad = 0
    for i in list(range(0, len(entries), max(1, len(entries) // 17))) + [len(entries) - 1]:
        libc.seekdir(d, entries[i][0])
        rest = []
        while (ent := _next(d)) is not None:
            rest.append(ent[0])
        if rest != names[i:]:
            bad += 1
    libc.closedir(d)
    print(f"entries={len(names)} distinct={len(set(names))} bad_seeks={bad}")


def cmd_interleave(path, first):
    """Reads `first` entries, removes every entry, then reads on: what does the reader see?"""
    before = sorted(os.listdir(path))
    d = _opendir(path)
    seen = _read_names(d, first)
    for n in before:
        p = os.path.join(path, n)
        if os.path.isdir(p) and not os.path.islink(p):
            os.rmdir(p)
        else:
            os.unlink(p)
    while (ent := _next(d)) is not None:
        seen.append(ent[0])
    libc.closedir(d)
    real = [n for n in seen if n not in (".", "..")]
    print(f"before={len(before)} seen={len(real)} distinct={len(set(real))} "
          f"unknown={len(set(real) - set(before))} after={len(os.listdir(path))}")


def cmd_dropmid(path, first, others):
    """Reads `first` entries of `path`, drops the page cache (a FUSE mount's cached listings
    with it, as memory pressure does), lists every directory under `others` (which pushes a
    daemon's listing of `path` out of any small cache), then reads on: the stream must go on
    where it was, every name once."""
    d = _opendir(path)
    seen = _read_names(d, first)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    for sub in sorted(os.listdir(others)):
        os.listdir(os.path.join(others, sub))
    while (ent := _next(d)) is not None:
        seen.append(ent[0])
    libc.closedir(d)
    names = sorted(n for n in seen if n not in (".", ".."))
    print(f"seen={len(names)} distinct={len(set(names))} "
          f"same_as_listdir={names == sorted(os.listdir(path))}")


def cmd_dots(path):
    d = _opendir(path)
    dots = {}
    while (ent := _next(d)) is not None:
        if ent[0] in (".", ".."):
            dots[ent[0]] = ent[1]
    libc.closedir(d)
    dot_ok = dots.get(".") == os.stat(path).st_ino
    dotdot_ok = dots.get("..") == os.stat(os.path.join(path, "..")).st_ino
    print(f"{path}: . {'ok' if dot_ok else 'differs'}, .. {'ok' if dotdot_ok else 'differs'}")


def cmd_stable(paths):
    before = [os.lstat(p).st_ino for p in paths]
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    after = [os.lstat(p).st_ino for p in paths]
    again = [os.lstat(p).st_ino for p in paths]
    changed = [p for p, a, b, c in zip(paths, before, after, again) if not a == b == c]
    print(f"stable={len(paths) - len(changed)} changed={changed}")


def cmd_statfs(mnt, ref):
    a, b = os.statvfs(mnt), os.statvfs(ref)
    print(f"bsize_equal={a.f_bsize == b.f_bsize} blocks_equal={a.f_blocks == b.f_blocks} "
          f"files_equal={a.f_files == b.f_files} namemax={a.f_namemax}")


def cmd_holes(path):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    out, pos = [], 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append(f"{data}-{hole}")
            pos = hole
    finally:
        os.close(fd)
    print(f"size={size} data=[{' '.join(out)}]")


def cmd_mmap(path):
    with open(path, "rb") as f:
        data = f.read()
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        mapped = m[:]
        m.close()
    print(f"mmap equal={data == mapped} sha={hashlib.sha256(mapped).hexdigest()[:12]}")


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "errno":
        cmd_errno(args[0], args[1], args[2] if len(args) > 2 else None)
    elif cmd == "seek":
        cmd_seek(args[0])
    elif cmd == "interleave":
        cmd_interleave(args[0], int(args[1]))
    elif cmd == "dropmid":
        cmd_dropmid(args[0], int(args[1]), args[2])
    elif cmd == "dots":
        cmd_dots(args[0])
    elif cmd == "stable":
        cmd_stable(args)
    elif cmd == "statfs":
        cmd_statfs(args[0], args[1])
    elif cmd == "holes":
        cmd_holes(args[0])
    elif cmd == "mmap":
        cmd_mmap(args[0])
    else:
        sys.exit(f"unknown probe {cmd}")


if __name__ == "__main__":
    main(sys.argv)
