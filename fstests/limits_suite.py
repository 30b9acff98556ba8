#!/usr/bin/env python3
"""Limits: the largest names, paths, directories, files and layer stacks the kernel allows, on
stratafs, kernel overlayfs and fuse-overlayfs, each checked through the mount and again after a
remount on the same upper layer.

  names     255-byte names: lookup, read, copy-up, rename, whiteout (file and directory),
            create, mkdir, symlink; a 256-byte name gives ENAMETOOLONG everywhere.
  paths     a lower tree deeper than PATH_MAX: a file whose path through the mount is exactly
            4095 bytes read, copied up and created; 4096 bytes gives ENAMETOOLONG; at a depth
            of over 6000 bytes, reached through directory file descriptors, read, copy-up,
            create, rename, unlink (whiteout) and readdir.
  bigdir    a lower directory of 100,000 entries (1,000,000 with --long): readdir count and
            names, random lookups, 1000 unlinks and 500 creates, counted again.
  bigfile   a sparse 5 GiB lower file with data at 0, across 4 GiB, at 4 GiB + 123457 and at
            the end: size and reads; an append copies it up and must keep it sparse in the
            upper layer; a new file written at 6 GiB.
  layers    500 lower layers (kernel overlayfs's limit): each adds a file, all add to one
            directory, one whites out a lower file, one has an opaque directory; lookups,
            readdir and a copy-up from the bottom layer. 501 layers: a target passes when it
            refuses (as the kernel does) or serves all 501 correctly; the detail says which.

Why: a userspace overlay rebuilds names and paths that the kernel keeps as dentries; every
fixed-size buffer, whiteout prefix (".wh." + 255 bytes is too long), full-path join (beyond
PATH_MAX), 32-bit offset, non-sparse copy loop and per-layer cost shows at these limits and
nowhere else. Kernel overlayfs is the oracle: a stratafs failure where the kernel passes is
a bug. The big fixtures are made once (in a cache) and shared by all targets as their lower
layers, which an overlay never changes.

Usage: python3 fstests/limits_suite.py [--binary PATH] [--targets stratafs,kernel,...]
       [--long] [--only names,paths,bigdir,bigfile,layers]
Ends with "N passed, M failed" for stratafs.
"""

import argparse
import errno
import os
import random
import shutil
import stat
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import union  # noqa: E402
from union import Union, errname  # noqa: E402

GIB = 1 << 30
KINDS = ["names", "paths", "bigdir", "bigfile", "layers"]


def write(path, data, dir_fd=None):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path, dir_fd=None):
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def expect_errno(want, fn, *args):
    """"" when fn(*args) fails with `want`, else what happened."""
    try:
        fn(*args)
    except OSError as e:
        return "" if e.errno == want else f"{fn.__name__}: {errname(e)}"
    return f"{fn.__name__}: succeeded"


def row(problems, what):
    problems = [p for p in problems if p]
    return [not problems, what + (f": {'; '.join(problems)[:600]}" if problems else "")]


def attempt(fn, *args):
    """Runs one step; an OSError becomes the step's problem text."""
    try:
        return fn(*args) or ""
    except OSError as e:
        where = os.path.basename(str(e.filename or ""))
        where = where[:24] + f"...({len(where)} bytes)" if len(where) > 40 else where
        return f"{getattr(fn, '__name__', 'step')}: {errname(e)} {where}"


class Case:
    """A fresh upper/work/merged under `base` over `lowers`; runs `phases` (each a function
    of the merged path returning rows) in a timed child, remounting between phases."""

    def __init__(self, target, binary, base, lowers, cwd=None, rel_lowers=None):
        for k in ("u", "w", "m"):
            os.makedirs(os.path.join(base, k), exist_ok=True)
        self.base = base
        self.union = Union(target, binary, lowers, *(os.path.join(base, k) for k in "uwm"),
                           cwd=cwd, rel_lowers=rel_lowers)

    def run(self, phases, timeout, label):
        rows = []
        try:
            for i, phase in enumerate(phases):
                try:
                    self.union.remount() if i else self.union.mount()
                except RuntimeError as e:
                    return rows + [[False, f"{label}: {'remount' if i else 'mount'}: {e}"]]
                ok, got = union.in_child(lambda: phase(self.union.merged), timeout, self.union)
                if not ok:
                    return rows + [[False, f"{label}: {got}"]]
                rows += got
            return rows
        finally:
            self.union.umount()


# ---------------------------------------------------------------- 255-byte names

def long_name(tag, n=255):
    return (tag + "_").ljust(n, "n")


NAMES = {t: long_name(t) for t in ("read", "copy", "ren", "renamed", "wh", "dir", "new",
                                   "newdir", "sym", "link")}
N256 = long_name("toolong", 256)


def build_names(lower):
    for t in ("read", "copy", "ren", "wh"):
        write(os.path.join(lower, NAMES[t]), f"lower {t}".encode())
    os.mkdir(os.path.join(lower, NAMES["dir"]))
    write(os.path.join(lower, NAMES["dir"], "inner"), b"inner")


def names_phase1(m):
    p = {t: os.path.join(m, n) for t, n in NAMES.items()}
    upper = os.path.join(os.path.dirname(m), "u")
    rows = [row([attempt(lambda: "" if read(p["read"]) == b"lower read" else "wrong content"),
                 "" if NAMES["read"] in os.listdir(m) else "not in readdir"],
                "255-byte name: lookup, read, readdir")]

    def copy_up():
        with open(p["copy"], "ab") as f:
            f.write(b"+")
        if read(p["copy"]) != b"lower copy+":
            return "wrong content after the append"
        return "" if read(os.path.join(upper, NAMES["copy"])) == b"lower copy+" else \
            "upper copy wrong"
    rows.append(row([attempt(copy_up)], "255-byte name: copy-up"))

    def rename():
        os.rename(p["ren"], p["renamed"])
        names = os.listdir(m)
        return (expect_errno(errno.ENOENT, os.stat, p["ren"]) or
                ("" if read(p["renamed"]) == b"lower ren" else "wrong content") or
                ("" if NAMES["renamed"] in names and NAMES["ren"] not in names else
                 "readdir shows the old name or not the new one"))
    rows.append(row([attempt(rename)], "255-byte name: rename a lower file to another"))

    def whiteout():
        os.unlink(p["wh"])
        os.unlink(os.path.join(p["dir"], "inner"))
        os.rmdir(p["dir"])
        names = os.listdir(m)
        return (expect_errno(errno.ENOENT, os.stat, p["wh"]) or
                expect_errno(errno.ENOENT, os.stat, p["dir"]) or
                ("" if NAMES["wh"] not in names and NAMES["dir"] not in names else
                 "readdir still shows a removed name"))
    rows.append(row([attempt(whiteout)], "255-byte name: whiteout of a lower file and dir"))

    def create():
        write(p["new"], b"new")
        os.mkdir(p["newdir"])
        os.symlink(NAMES["read"], p["sym"])
        return "" if read(p["new"]) == b"new" and read(p["sym"]) == b"lower read" else \
            "wrong content"

    def link():
        os.link(p["read"], p["link"])
        return "" if read(p["link"]) == b"lower read" else "wrong content"
    rows.append(row([attempt(create)], "255-byte name: create, mkdir, symlink"))
    rows.append(row([attempt(link)], "255-byte name: hard link to a lower file"))
    t = os.path.join(m, N256)
    rows.append(row([expect_errno(errno.ENAMETOOLONG, write, t, b"x"),
                     expect_errno(errno.ENAMETOOLONG, os.stat, t),
                     expect_errno(errno.ENAMETOOLONG, os.mkdir, t),
                     expect_errno(errno.ENAMETOOLONG, os.rename, p["read"], t),
                     expect_errno(errno.ENAMETOOLONG, os.symlink, "x", t),
                     expect_errno(errno.ENAMETOOLONG, os.link, p["read"], t)],
                    "256-byte name: ENAMETOOLONG for create, lookup, mkdir, rename, symlink, "
                    "link"))
    return rows


def names_phase2(m):
    def check():
        want = {"read": b"lower read", "copy": b"lower copy+", "renamed": b"lower ren",
                "new": b"new", "sym": b"lower read", "link": b"lower read"}
        bad = [t for t, data in want.items() if read(os.path.join(m, NAMES[t])) != data]
        gone = [t for t in ("ren", "wh", "dir") if os.path.lexists(os.path.join(m, NAMES[t]))]
        return (f"wrong: {bad} " if bad else "") + (f"back: {gone}" if gone else "")
    return [row([attempt(check)], "255-byte names after a remount")]


def run_names(target, binary, base, cache, long):
    lower = os.path.join(base, "l")
    os.makedirs(lower)
    build_names(lower)
    return Case(target, binary, base, [lower]).run([names_phase1, names_phase2], 60, "names")


# ---------------------------------------------------------------- paths beyond PATH_MAX

def comp(i):
    return f"c{i:03d}".ljust(200, "x")


def deep_plan(merged):
    """(components down to the 4095-byte level, the edge file name, components beyond)."""
    total, comps = len(merged), []
    while total + 1 + 201 + 2 <= 4095:
        comps.append(comp(len(comps)))
        total += 201
    pad = 4095 - total - 1
    deeper = [comp(len(comps) + i) for i in range(12)]
    return comps, "e" * pad, deeper


def walk(root, comps):
    """An O_PATH-free walk: a directory fd for root/comps[0]/comps[1]/... (caller closes)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for c in comps:
        nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def build_deep(lower, merged):
    comps, edge, deeper = deep_plan(merged)
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    for i, c in enumerate(comps + deeper):
        os.mkdir(c, dir_fd=fd)
        nfd = os.open(c, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        write("f", f"level {i}".encode(), dir_fd=fd)
        if i == len(comps) - 1:
            write(edge, b"edge", dir_fd=fd)
            write(edge + "e", b"edge+1", dir_fd=fd)
    write("u", b"to be unlinked", dir_fd=fd)
    os.close(fd)


def paths_phase1(m):
    comps, edge, deeper = deep_plan(m)
    d = os.path.join(m, *comps)
    full, over = os.path.join(d, edge), os.path.join(d, edge + "e")
    assert len(full) == 4095 and len(over) == 4096
    rows = [row([attempt(lambda: "" if read(full) == b"edge" else "wrong content")],
                "path of 4095 bytes: read")]

    def copy_up():
        with open(full, "ab") as f:
            f.write(b"+")
        write(os.path.join(d, "n" * len(edge)), b"new")
        ufd = walk(os.path.join(os.path.dirname(m), "u"), comps)
        try:
            upper = read(edge, dir_fd=ufd)
        finally:
            os.close(ufd)
        return (("" if read(full) == b"edge+" else "wrong content after the append") or
                ("" if upper == b"edge+" else "upper copy wrong") or
                ("" if read(os.path.join(d, "n" * len(edge))) == b"new" else "created wrong"))
    rows.append(row([attempt(copy_up)], "path of 4095 bytes: copy-up and create"))
    rows.append(row([expect_errno(errno.ENAMETOOLONG, read, over),
                     expect_errno(errno.ENAMETOOLONG, os.stat, over),
                     expect_errno(errno.ENAMETOOLONG, write, os.path.join(d, "n" * (len(edge) + 1)),
                                  b"x")],
                    "path of 4096 bytes: ENAMETOOLONG"))

    def beyond():
        fd = walk(m, comps + deeper)
        try:
            depth = len(os.path.join(m, *comps, *deeper))
            if read("f", dir_fd=fd) != f"level {len(comps + deeper) - 1}".encode():
                return "wrong content at the bottom"
            wfd = os.open("f", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
            os.write(wfd, b"+")
            os.close(wfd)
            write("g", b"new", dir_fd=fd)
            os.rename("g", "h", src_dir_fd=fd, dst_dir_fd=fd)
            os.unlink("u", dir_fd=fd)
            names = sorted(os.listdir(fd))
            if names != ["f", "h"]:
                return f"readdir at depth {depth}: {names}"
            if read("f", dir_fd=fd) != f"level {len(comps + deeper) - 1}+".encode():
                return "wrong content after the append"
            return ""
        finally:
            os.close(fd)
    rows.append(row([attempt(beyond)], f"beyond PATH_MAX ({len(comps + deeper)} levels, "
                    f"{len(os.path.join(m, *comps, *deeper))} bytes) through directory fds: "
                    "read, copy-up, create, rename, unlink, readdir"))
    return rows


def paths_phase2(m):
    comps, edge, deeper = deep_plan(m)

    def check():
        fd = walk(m, comps)
        try:
            if read(edge, dir_fd=fd) != b"edge+":
                return "edge file wrong"
        finally:
            os.close(fd)
        fd = walk(m, comps + deeper)
        try:
            names = sorted(os.listdir(fd))
            return "" if names == ["f", "h"] else f"bottom holds {names}"
        finally:
            os.close(fd)
    return [row([attempt(check)], "deep tree after a remount")]


def run_paths(target, binary, base, cache, long):
    lower = os.path.join(base, "l")
    os.makedirs(lower)
    build_deep(lower, os.path.join(base, "m"))  # l, u, m: paths of the same length
    return Case(target, binary, base, [lower]).run([paths_phase1, paths_phase2], 120, "paths")


# ---------------------------------------------------------------- a large directory

def big_names(n):
    return [f"e{i:07d}" for i in range(n)]


def build_bigdir(lower, n):
    os.makedirs(os.path.join(lower, "big"))
    fd = os.open(os.path.join(lower, "big"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in big_names(n):
            os.mknod(name, 0o644 | stat.S_IFREG, dir_fd=fd)
    finally:
        os.close(fd)


def bigdir_phases(n):
    rng = random.Random(n)
    names = big_names(n)
    gone = set(rng.sample(names, 1000))
    new = {f"new{i}" for i in range(500)}
    final = set(names) - gone | new

    def listing(m, want, what):
        t0 = time.time()
        got = os.listdir(os.path.join(m, "big"))
        took = time.time() - t0
        if len(got) != len(want) or set(got) != want:
            return [False, f"{what}: {len(got)} names ({len(set(got))} distinct), want "
                    f"{len(want)}; missing {sorted(want - set(got))[:3]}, extra "
                    f"{sorted(set(got) - want)[:3]}"]
        return [True, f"{what} ({took:.1f} s)"]

    def phase1(m):
        big = os.path.join(m, "big")
        rows = [listing(m, set(names), f"readdir of {n} lower entries")]
        probe = rng.sample(names, 2000)
        rows.append(row([attempt(lambda: "" if all(stat.S_ISREG(os.stat(os.path.join(big, x))
                                                                 .st_mode) for x in probe)
                                 else "not a file")] +
                        [expect_errno(errno.ENOENT, os.stat, os.path.join(big, f"nope{i}"))
                         for i in range(200)],
                        "lookup of 2000 random names and 200 missing ones"))
        def unlink_all():
            for x in sorted(gone):
                os.unlink(os.path.join(big, x))
        rows.append(row([attempt(unlink_all)] +
                        [expect_errno(errno.ENOENT, os.stat, os.path.join(big, x))
                         for x in sorted(gone)[:50]], "unlink of 1000 lower entries"))
        for x in sorted(new):
            os.mknod(os.path.join(big, x), 0o644 | stat.S_IFREG)
        rows.append(listing(m, final, "readdir after 1000 unlinks and 500 creates"))
        return rows

    def phase2(m):
        return [listing(m, final, "readdir after a remount")]
    return [phase1, phase2]


def run_bigdir(target, binary, base, cache, long):
    n = 1_000_000 if long else 100_000
    lower = os.path.join(cache, f"bigdir-{n}")
    if not os.path.exists(os.path.join(lower, "done")):
        shutil.rmtree(lower, ignore_errors=True)
        build_bigdir(lower, n)
        write(os.path.join(lower, "done"), b"")
    return Case(target, binary, base, [lower]).run(bigdir_phases(n), 900 if long else 180,
                                                   "bigdir")


# ---------------------------------------------------------------- a file over 4 GiB

SIZE = 5 * GIB
REGIONS = {0: b"start" * 13107, 4 * GIB - 2048: b"across4G" * 512,
           4 * GIB + 123457: b"past4G" * 1365, SIZE - 100: b"end!" * 25}
FAR = 6 * GIB + 7


def build_bigfile(lower):
    os.makedirs(lower)
    with open(os.path.join(lower, "big"), "wb") as f:
        f.truncate(SIZE)
        for off, data in REGIONS.items():
            os.pwrite(f.fileno(), data, off)


def check_regions(path, extra=()):
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, data in list(REGIONS.items()) + list(extra):
            got = os.pread(fd, len(data), off)
            if got != data:
                return f"at {off}: {len(got)} bytes, {got[:16]!r}"
        hole = os.pread(fd, 4096, 2 * GIB)
        return "" if hole == b"\0" * 4096 else "a hole reads non-zero"
    finally:
        os.close(fd)


def upper_blocks(m, name):
    st = os.stat(os.path.join(os.path.dirname(m), "u", name))
    return st.st_size, st.st_blocks * 512


def bigfile_phase1(m):
    big = os.path.join(m, "big")
    rows = [row([attempt(lambda: "" if os.stat(big).st_size == SIZE else
                         f"size {os.stat(big).st_size}"), attempt(check_regions, big)],
                "5 GiB sparse lower file: size, reads at 0, across 4 GiB, past 4 GiB, end")]

    def append():
        with open(big, "ab") as f:
            f.write(b"tail")
        size, used = upper_blocks(m, "big")
        return ((attempt(check_regions, big, [(SIZE, b"tail")])) or
                ("" if os.stat(big).st_size == SIZE + 4 else "wrong size") or
                ("" if size == SIZE + 4 else f"upper size {size}") or
                ("" if used < 64 << 20 else f"upper copy uses {used >> 20} MiB: not sparse"))
    rows.append(row([attempt(append)], "copy-up of the 5 GiB file by an append: content, "
                    "sparse upper"))

    def far():
        write(os.path.join(m, "far"), b"")
        fd = os.open(os.path.join(m, "far"), os.O_WRONLY)
        os.pwrite(fd, b"far", FAR)
        os.close(fd)
        fd = os.open(os.path.join(m, "far"), os.O_RDONLY)
        got = os.pread(fd, 3, FAR)
        os.close(fd)
        size, used = upper_blocks(m, "far")
        return (("" if got == b"far" else f"read {got!r}") or
                ("" if os.stat(os.path.join(m, "far")).st_size == FAR + 3 else "wrong size") or
                ("" if used < 1 << 20 else f"upper uses {used >> 20} MiB"))
    rows.append(row([attempt(far)], "new file written at 6 GiB"))
    return rows


def bigfile_phase2(m):
    def far():
        fd = os.open(os.path.join(m, "far"), os.O_RDONLY)
        try:
            return "" if os.pread(fd, 3, FAR) == b"far" else "the file at 6 GiB lost its data"
        finally:
            os.close(fd)
    return [row([attempt(check_regions, os.path.join(m, "big"), [(SIZE, b"tail")]),
                 attempt(far)], "5 GiB file and the file at 6 GiB after a remount")]


def run_bigfile(target, binary, base, cache, long):
    lower = os.path.join(cache, "bigfile")
    if not os.path.exists(os.path.join(lower, "big")):
        build_bigfile(lower)
    return Case(target, binary, base, [lower]).run([bigfile_phase1, bigfile_phase2], 300,
                                                   "bigfile")


# ---------------------------------------------------------------- 500 layers

WHITEOUT_AT, WHITED_OUT, OPAQUE_AT = 250, 100, 300


def build_layers(top, count):
    for i in range(count):
        layer = os.path.join(top, str(i))
        os.makedirs(os.path.join(layer, "d"))
        os.makedirs(os.path.join(layer, "o"))
        write(os.path.join(layer, f"f{i}"), f"layer {i}".encode())
        write(os.path.join(layer, "d", f"g{i}"), b"")
        write(os.path.join(layer, "o", f"o{i}"), b"")
        write(os.path.join(layer, "top"), str(i).encode())
        if i == WHITEOUT_AT:
            os.mknod(os.path.join(layer, f"f{WHITED_OUT}"), stat.S_IFCHR | 0o600,
                     os.makedev(0, 0))
        if i == OPAQUE_AT:
            os.setxattr(os.path.join(layer, "o"), "trusted.overlay.opaque", b"y")


def layers_check(m, count):
    """Problems of a mount of layers count-1 .. 0."""
    probs = []
    want_root = {f"f{i}" for i in range(count)} - {f"f{WHITED_OUT}"} | {"d", "o", "top"}
    for d, want in (("", want_root), ("d", {f"g{i}" for i in range(count)}),
                    ("o", {f"o{i}" for i in range(OPAQUE_AT, count)})):
        got = os.listdir(os.path.join(m, d))
        if len(got) != len(set(got)) or set(got) != want:
            probs.append(f"readdir /{d}: {len(got)} names, missing {sorted(want - set(got))[:3]}"
                         f", extra {sorted(set(got) - want)[:3]}")
    bad = [i for i in range(count) if i != WHITED_OUT and
           read(os.path.join(m, f"f{i}")) != f"layer {i}".encode()]
    if bad:
        probs.append(f"wrong content of f{bad[:5]}")
    probs.append(expect_errno(errno.ENOENT, os.stat, os.path.join(m, f"f{WHITED_OUT}")))
    if read(os.path.join(m, "top")) != str(count - 1).encode():
        probs.append(f"top reads {read(os.path.join(m, 'top'))!r}")
    return [p for p in probs if p]


def layers_phase1(m):
    rows = [row([attempt(lambda: "; ".join(layers_check(m, 500)))],
                "500 layers: lookups, whiteout, opaque dir, readdir merged from all")]

    def copy_up():
        with open(os.path.join(m, "f0"), "ab") as f:
            f.write(b"+")
        return "" if read(os.path.join(m, "f0")) == b"layer 0+" else "wrong content"
    rows.append(row([attempt(copy_up)], "500 layers: copy-up from the bottom layer"))
    return rows


def layers_phase2(m):
    return [row([attempt(lambda: "" if read(os.path.join(m, "f0")) == b"layer 0+" else
                         "copy-up lost")], "500 layers: after a remount")]


def layers_501(target, binary, base, top):
    lowers = [os.path.join(top, str(i)) for i in reversed(range(501))]
    case = Case(target, binary, base, lowers, cwd=top, rel_lowers=[str(i) for i in
                                                                   reversed(range(501))])
    try:
        case.union.mount()
    except RuntimeError as e:
        left = union.mount_source(case.union.merged)
        return [[not left, f"501 layers: refused ({str(e)[-120:]})" +
                 (", but a mount is left behind" if left else "")]]
    try:
        ok, got = union.in_child(lambda: "; ".join(layers_check(case.union.merged, 501)), 120,
                                 case.union)
        good = ok and not got
        return [[good, "501 layers: mounted and served all 501" if good else
                 f"501 layers: mounted but wrong: {got}"]]
    finally:
        case.union.umount()


def run_layers(target, binary, base, cache, long):
    top = os.path.join(cache, "layers")
    if not os.path.exists(os.path.join(top, "done")):
        shutil.rmtree(top, ignore_errors=True)
        build_layers(top, 501)
        write(os.path.join(top, "done"), b"")
    lowers = [os.path.join(top, str(i)) for i in reversed(range(500))]
    rows = Case(target, binary, os.path.join(base, "500"), lowers, cwd=top,
                rel_lowers=[str(i) for i in reversed(range(500))]).run(
        [layers_phase1, layers_phase2], 120, "layers")
    return rows + layers_501(target, binary, os.path.join(base, "501"), top)


# ---------------------------------------------------------------- running

RUNNERS = {"names": run_names, "paths": run_paths, "bigdir": run_bigdir,
           "bigfile": run_bigfile, "layers": run_layers}


def cases(target, binary, scratch, cache, long=False, only=KINDS):
    """Yields (ok, what) for each case on `target`; `cache` keeps the big fixtures between
    targets."""
    os.umask(0o022)
    for kind in only:
        base = tempfile.mkdtemp(prefix=f"lim-{kind}-{target}-", dir=scratch)
        try:
            for ok, what in RUNNERS[kind](target, binary, base, cache, long):
                yield ok, what
        except (OSError, RuntimeError) as e:
            yield False, f"{kind}: {type(e).__name__}: {e}"
        finally:
            union.unmount_all_under(base)
            shutil.rmtree(base, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=union.DEFAULT_BINARY)
    ap.add_argument("--targets", default=",".join(union.TARGETS))
    ap.add_argument("--long", action="store_true", help="1,000,000 directory entries")
    ap.add_argument("--only", default=",".join(KINDS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("limits: run as root")
    union.enter_private_mount_namespace()
    scratch = tempfile.mkdtemp(prefix="stratafs-limits-", dir="/var/tmp")
    cache = os.path.join(scratch, "cache")
    os.makedirs(cache)
    try:
        return union.run_and_count(
            args.targets.split(","),
            lambda target: cases(target, os.path.abspath(args.binary), scratch, cache,
                                 args.long, args.only.split(",")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
