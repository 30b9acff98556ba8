#!/usr/bin/env python3
"""Read-side differential suite: the same layer stacks mounted by kernel overlayfs and by
stratafs must show the same merged tree.

Why: kernel overlayfs defines what a union of layers looks like; stratafs is correct exactly
when nothing a program can observe differs. Each scenario

  1. builds a layer fixture twice: once in the kernel's encodings (0/0 character-device or
     xattr whiteouts, trusted.overlay.opaque), once in the encoding under test for stratafs
     (`.wh.NAME` files, `.wh..wh..opq`, user.overlay.opaque, user.fuseoverlayfs.opaque, ...),
  2. mounts kernel overlayfs on the first and stratafs on the second (relative layer paths,
     the fuse-overlayfs command line),
  3. runs the same shell snippet in both (outputs compared after the paths are normalised;
     fstests/probe.py prints errnos, telldir/seekdir and readdir-with-unlink behaviour, d_ino
     of "." and "..", inode stability across dropped caches, statfs, SEEK_DATA/SEEK_HOLE),
  4. compares the merged trees: names, types, modes, owners, sizes, content hashes, link
     counts, symlink targets, device numbers, mtimes, xattrs, which names share an inode,
     and that readdir's d_ino equals st_ino,
  5. where both copies were built alike, compares what each left in the upper layer.

A scenario with a `check` tests stratafs alone (the kernel has nothing to compare it with),
e.g. that the daemon's count of kernel lookups balances after READDIRPLUS replies.

Usage: python3 fstests/read_suite.py [--binary PATH] [--filter SUBSTR] [--list]
Ends with the line "N passed, M failed".
"""

import argparse
import dataclasses
import os
import re
import socket
import stat
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

KERNEL_OPTS = "redirect_dir=on,metacopy=on,index=on"


@dataclasses.dataclass
class Scenario:
    name: str
    build: Callable
    script: str = ""
    nlower: int = 2
    upper: bool = True
    whiteout: str = "chardev"  # chardev | wh | xattr (kernel copy: chardev, or xattr)
    opaque: str = "trusted"  # trusted | user | fuseoverlayfs | wh (kernel copy: trusted)
    kernel_opts: str = KERNEL_OPTS
    strata_opts: str = ""
    separate_fs: bool = False  # every layer on a tmpfs of its own
    symlinked_layers: bool = False  # layers named through symlinks (containers-storage's l/)
    times: bool = True  # compare mtimes (not when the script changes the tree)
    check: Callable = None  # a stratafs-only check(binary, stack) -> problems, run instead

    def alike(self):
        """Whether both copies are built in the same encodings (then uppers compare)."""
        return self.whiteout in ("chardev", "xattr") and self.opaque == "trusted"


# ---------------------------------------------------------------- building layers

class Stack:
    """One copy of a fixture: lowers l/0 (top) .. l/N-1, upper u, workdir w, mount point m.
    `kernel` selects the kernel's encodings for whiteouts and opaque directories."""

    def __init__(self, top, sc, kernel):
        self.top, self.sc, self.kernel = top, sc, kernel
        self.wh = sc.whiteout if not kernel or sc.whiteout == "xattr" else "chardev"
        self.opq = sc.opaque if not kernel else "trusted"
        os.makedirs(f"{top}/m")
        names = [f"l/{i}" for i in range(sc.nlower)] + (["uw"] if sc.upper else [])
        for n in names:
            os.makedirs(f"{top}/{n}")
            if sc.separate_fs:
                subprocess.run(["mount", "-t", "tmpfs", "-o", "inode32,mode=755", "tmpfs",
                                f"{top}/{n}"], check=True)
        if sc.upper:
            os.makedirs(f"{top}/uw/u")
            os.makedirs(f"{top}/uw/w")
        self.lowers = [f"l/{i}" for i in range(sc.nlower)]
        if sc.symlinked_layers:
            os.makedirs(f"{top}/links")
            for i in range(sc.nlower):
                os.symlink(f"../l/{i}", f"{top}/links/L{i}")
            self.lowers = [f"links/L{i}" for i in range(sc.nlower)]

    def root(self, layer):
        return f"{self.top}/uw/u" if layer == "u" else f"{self.top}/l/{layer}"

    def path(self, layer, rel):
        p = os.path.join(self.root(layer), rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def file(self, layer, rel, content="", mode=0o644, owner=None, xattrs=()):
        p = self.path(layer, rel)
        with open(p, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.chmod(p, mode)
        self._finish(p, owner, xattrs)

    def dir(self, layer, rel, mode=0o755, owner=None, xattrs=()):
        p = self.path(layer, rel)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, mode)
        self._finish(p, owner, xattrs)

    def symlink(self, layer, rel, target):
        os.symlink(target, self.path(layer, rel))

    def link(self, layer, rel, existing):
        os.link(os.path.join(self.root(layer), existing), self.path(layer, rel))

    def fifo(self, layer, rel):
        os.mkfifo(self.path(layer, rel))

    def device(self, layer, rel, kind, major, minor):
        mode = (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o640
        os.mknod(self.path(layer, rel), mode, os.makedev(major, minor))

    def sock(self, layer, rel):
        s = socket.socket(socket.AF_UNIX)
        s.bind(self.path(layer, rel))
        s.close()

    def _finish(self, p, owner, xattrs):
        if owner:
            os.chown(p, *owner, follow_symlinks=False)
        for k, v in xattrs:
            os.setxattr(p, k, v, follow_symlinks=False)

    def whiteout(self, layer, rel):
        """Deletes `rel` in every layer below `layer`, in this copy's encoding."""
        enc = self.wh
        if enc == "xattr" and layer == "u":
            enc = "chardev"  # the kernel honours xattr whiteouts in lower layers only
        p = self.path(layer, rel)
        if enc == "chardev":
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        elif enc == "wh":
            d, n = os.path.split(p)
            open(os.path.join(d, ".wh." + n), "w").close()
        else:
            open(p, "w").close()
            os.setxattr(p, "trusted.overlay.whiteout", b"y")
            parent = os.path.dirname(p)
            try:
                marked = os.getxattr(parent, "trusted.overlay.opaque") == b"y"
            except OSError:
                marked = False
            if not marked:
                os.setxattr(parent, "trusted.overlay.opaque", b"x")

    def opaque(self, layer, rel):
        """Makes directory `rel` of `layer` hide everything below it, in this copy's encoding."""
        p = self.path(layer, rel)
        os.makedirs(p, exist_ok=True)
        if self.opq == "wh":
            open(os.path.join(p, ".wh..wh..opq"), "w").close()
        else:
            name = {"trusted": "trusted.overlay.opaque", "user": "user.overlay.opaque",
                    "fuseoverlayfs": "user.fuseoverlayfs.opaque"}[self.opq]
            os.setxattr(p, name, b"y")

    def finish(self):
        for i in range(self.sc.nlower):
            common.stamp_times(self.root(i))
        if self.sc.upper:
            common.stamp_times(self.root("u"))


# ---------------------------------------------------------------- fixtures

def small_tree(s, layer, prefix=""):
    s.file(layer, f"{prefix}a", "alpha\n")
    s.file(layer, f"{prefix}b", "bravo\n", 0o600)
    s.file(layer, f"{prefix}empty", "")
    s.dir(layer, f"{prefix}d/e")
    s.file(layer, f"{prefix}d/e/f", "deep\n", 0o755)
    s.dir(layer, f"{prefix}emptydir", 0o700)
    s.symlink(layer, f"{prefix}s", "a")


def fx_upper_only(s):
    small_tree(s, "u")


def fx_lower_only(s):
    small_tree(s, 0)


def fx_lower_only_ro(s):
    small_tree(s, 0)
    small_tree(s, 1, "x")
    s.file(1, "a", "hidden by l0\n")


def fx_file_override(s):
    s.file(1, "f", "bottom\n", 0o600, (1, 2))
    s.file(0, "f", "middle version\n", 0o640, (3, 4))
    s.file("u", "f", "upper version!\n", 0o644, (5, 6))
    s.file(1, "g", "bottom g\n")
    s.file(0, "g", "top g\n", 0o755)
    s.file(0, "h", "lower h\n")
    s.symlink("u", "h", "g")
    s.file(1, "only1", "1\n")


def fx_merged_dirs(s):
    for layer in (2, 1, 0, "u"):
        s.dir(layer, "d", 0o755 if layer != 0 else 0o750)
        s.file(layer, f"d/from-{layer}", f"{layer}\n")
        s.file(layer, "d/common", f"common from {layer}\n")
    s.dir(2, "d/sub/inner")
    s.file(2, "d/sub/inner/x", "x\n")
    s.dir("u", "d/sub")
    s.file("u", "d/sub/y", "y\n")
    s.dir(1, "lowdir/a")
    s.dir(1, "lowdir/b")
    s.dir("u", "updir/a")
    s.dir("u", "updir/b")


def fx_type_mix(s):
    s.dir(1, "x")
    s.file(1, "x/child", "c\n")
    s.file(0, "x", "file over dir\n")
    s.file(1, "y", "file below\n")
    s.dir(0, "y")
    s.file(0, "y/child", "c\n")
    s.file(0, "z", "lower z\n")
    s.dir("u", "z")
    s.file("u", "z/in", "in\n")
    s.dir(0, "w")
    s.file(0, "w/child", "c\n")
    s.file("u", "w", "file over lower dir\n")
    s.dir(1, "v")
    s.file(1, "v/child", "c\n")
    s.dir(0, "elsewhere")
    s.file(0, "elsewhere/t", "t\n")
    s.symlink("u", "v", "elsewhere")
    s.dir(1, "mid")
    s.file(1, "mid/b", "b\n")
    s.symlink(0, "mid", "elsewhere")
    s.dir("u", "mid")


WHITEOUT_SCRIPT = """
for p in f d d/child g nothing h k k/low k/up; do $PROBE errno lstat $p; done
$PROBE errno listxattr f; $PROBE errno readlink g; ls -A; ls -A k
"""


def fx_whiteouts(s):
    s.file(0, "f", "lower f\n")
    s.whiteout("u", "f")
    s.dir(0, "d")
    s.file(0, "d/child", "c\n")
    s.whiteout("u", "d")
    s.file(1, "g", "bottom g\n")
    s.whiteout(0, "g")
    if s.sc.whiteout != "xattr":
        # The kernel reads no xattr whiteouts in the bottom layer in lookups but lists them
        # in readdir; pointless there anyway (nothing below to hide).
        s.whiteout(1, "nothing")
    s.whiteout("u", "never-existed")
    s.file(1, "h", "bottom h\n")
    s.whiteout(0, "h")
    s.file("u", "h", "upper h over a whiteout\n")
    s.dir(1, "k")
    s.file(1, "k/low", "low\n")
    s.whiteout(0, "k")
    s.dir("u", "k")
    s.file("u", "k/up", "up\n")
    s.dir(1, "m")
    s.file(1, "m/x", "x\n")
    s.file(1, "m/y", "y\n")
    s.dir(0, "m")
    s.whiteout(0, "m/x")
    s.file(0, "m/z", "z\n")


def fx_whiteout_names(s):
    long = "n" * 251
    s.file(0, long, "long\n")
    s.whiteout("u", long)
    s.file(0, ".whx", "not a whiteout\n")
    s.file(0, "..wh", "not a whiteout either\n")
    s.file(1, "top-level", "t\n")
    s.whiteout(0, "top-level")
    s.dir(1, "a/b/c")
    s.file(1, "a/b/c/deep", "deep\n")
    s.dir(0, "a/b/c")
    s.whiteout(0, "a/b/c/deep")
    s.file(0, "a/b/c/kept", "kept\n")


OPAQUE_SCRIPT = """
for p in d/old d/new e/below e/above o/bottom m/s/hidden m/s/shown m/other; do $PROBE errno stat $p; done
ls -A d e o m m/s; $PROBE errno getxattr d trusted.overlay.opaque
"""


def fx_opaque(s):
    s.dir(0, "d")
    s.file(0, "d/old", "old\n")
    s.opaque("u", "d")
    s.file("u", "d/new", "new\n")
    s.dir(1, "e")
    s.file(1, "e/below", "below\n")
    s.opaque(0, "e")
    s.file(0, "e/above", "above\n")
    s.opaque(1, "o")
    s.file(1, "o/bottom", "bottom\n")
    s.dir(1, "m/s")
    s.file(1, "m/s/hidden", "h\n")
    s.file(1, "m/other", "o\n")
    s.opaque(0, "m/s")
    s.file(0, "m/s/shown", "s\n")
    # Not built: a whiteout inside an opaque upper directory. Kernel overlayfs lists it in
    # readdir (the directory is not merged, so its real listing is passed through) but fails
    # its lookup; stratafs hides it in both. Such layers are hand-made only: the kernel never
    # writes whiteouts into a new opaque directory.


def fx_mixed_encodings(s):
    """Layers from different producers in one stack (only meaningful for stratafs: the
    kernel copy gets the kernel's encodings)."""
    for i in range(4):
        s.dir(i, "d")
        s.file(i, f"d/f{i}", f"{i}\n")
    s.file(3, "d/gone-in-2", "x\n")
    s.file(3, "d/gone-in-1", "x\n")
    s.file(3, "d/gone-in-0", "x\n")
    for layer, enc in ((2, "xattr"), (1, "chardev"), (0, "wh")):
        saved = s.wh
        if not s.kernel:
            s.wh = enc
        elif enc == "xattr":
            s.wh = "xattr"
        s.whiteout(layer, f"d/gone-in-{layer}")
        s.wh = saved
    for layer, enc, name in ((2, "fuseoverlayfs", "o2"), (1, "user", "o1"), (0, "wh", "o0")):
        s.dir(3, f"{name}")
        s.file(3, f"{name}/hidden", "h\n")
        saved = s.opq
        if not s.kernel:
            s.opq = enc
        s.opaque(layer, name)
        s.opq = saved
        s.file(layer, f"{name}/visible", "v\n")


def fx_xattr_whiteouts(s):
    """The kernel's own xattr whiteouts (6.7+): zero-size files with overlay.whiteout in a
    directory marked overlay.opaque=x, built the same for both."""
    s.dir(1, "d")
    for n in ("a", "b", "c"):
        s.file(1, f"d/{n}", f"{n}\n")
    s.dir(0, "d")
    for n in ("a", "c"):
        p = s.path(0, f"d/{n}")
        open(p, "w").close()
        os.setxattr(p, "trusted.overlay.whiteout", b"y")
    os.setxattr(s.path(0, "d"), "trusted.overlay.opaque", b"x")
    # Not built: an xattr whiteout in a directory not marked opaque=x. Kernel overlayfs
    # honours it in lookups once any marked directory of that layer was seen and never in
    # readdir (so whether the name exists depends on history); stratafs honours xattr
    # whiteouts in marked directories only.


def fx_deep(s):
    n = s.sc.nlower
    for i in range(n):
        s.file(i, "chain", f"layer {i}\n")
        s.file(i, f"common/f{i}", f"{i}\n")
        if i % 10 == 9 and i + 1 < n:
            s.file(i + 1, f"common/w{i}", "hidden\n")
            s.whiteout(i, f"common/w{i}")
    s.file(n - 1, "deep/a/b/c/file", "bottom\n")
    for i in range(0, n, 7):
        s.dir(i, "deep/a/b")
        s.file(i, f"deep/a/b/l{i}", "x\n")
    mid = n // 2
    s.opaque(mid, "op")
    s.file(mid, "op/shown", "s\n")
    s.file(n - 1, "op/hidden", "h\n")


def fx_layer_per_file(s):
    for i in range(s.sc.nlower):
        s.file(i, f"d/f{i:03}", f"{i}\n")


def long_whiteout_name(sc):
    """The longest name a whiteout can hide: `.wh.NAME` must fit in 255 bytes too."""
    return "w" * (251 if sc.whiteout == "wh" else 255)


def fx_long_names(s):
    n255 = "x" * 255
    s.file(0, n255, "255\n")
    s.dir("u", "d" * 255)
    s.file("u", f"{'d' * 255}/{'y' * 255}", "y\n")
    s.symlink(0, "s" * 255, "t" * 4095)
    s.file(0, long_whiteout_name(s.sc), "whited\n")
    s.whiteout("u", long_whiteout_name(s.sc))
    s.dir(1, "o" * 255)
    s.file(1, f"{'o' * 255}/old", "old\n")
    s.opaque(0, "o" * 255)


LONG_SCRIPT = f"""
$PROBE errno stat {'z' * 256}; $PROBE errno stat {'x' * 255}; $PROBE errno stat {'w' * 255}
$PROBE errno stat {'w' * 251}
$PROBE errno stat {'o' * 255}/old; $PROBE errno readlink {'s' * 255}
"""


def fx_special(s):
    for layer in (0, "u"):
        pre = f"{layer}-"
        s.fifo(layer, pre + "fifo")
        s.device(layer, pre + "null", "c", 1, 3)
        s.device(layer, pre + "loop", "b", 7, 0)
        s.sock(layer, pre + "sock")
        s.file(layer, pre + "target", "t\n")
        s.dir(layer, pre + "dirtarget")
        s.symlink(layer, pre + "rel", pre + "target")
        s.symlink(layer, pre + "abs", "/etc/hostname")
        s.symlink(layer, pre + "dangling", "does/not/exist")
        s.symlink(layer, pre + "todir", pre + "dirtarget")
        s.symlink(layer, pre + "loop1", pre + "loop2")
        s.symlink(layer, pre + "loop2", pre + "loop1")


SPECIAL_SCRIPT = """
for l in 0 u; do
  $PROBE errno readlink $l-target; $PROBE errno stat $l-loop1; $PROBE errno open_r $l-dangling
  $PROBE errno opendir $l-todir; $PROBE errno stat $l-todir/; cat $l-rel
done
"""


def fx_modes_owners(s):
    for layer in (0, "u"):
        s.file(layer, f"{layer}/zero", "z\n", 0o000)
        s.file(layer, f"{layer}/setuid", "s\n", 0o4755, (1000, 1000))
        s.file(layer, f"{layer}/setgid", "g\n", 0o2755, (0, 50))
        s.dir(layer, f"{layer}/sticky", 0o1777)
        s.dir(layer, f"{layer}/private", 0o700, (65534, 65534))
        s.file(layer, f"{layer}/private/f", "p\n", 0o600, (65534, 65534))
        s.file(layer, f"{layer}/bigids", "b\n", 0o644, (4294967294, 4294967293))
        s.dir(layer, f"{layer}/nomode", 0o000)
        s.file(layer, f"{layer}/nomode/inside", "i\n")


def fx_hardlinks(s):
    s.file(0, "a", "linked\n")
    s.link(0, "sub/b", "a")
    s.link(0, "c", "a")
    s.file("u", "x", "upper linked\n")
    s.link("u", "y", "x")
    s.file(1, "p", "p\n")
    s.link(1, "q", "p")
    s.whiteout(0, "q")
    s.file(1, "r", "r\n")
    s.link(1, "t", "r")
    s.file(0, "t", "t overridden\n")


POSIX_ACL = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff" + b"\x02\x00\x04\x00\xe8\x03\x00\x00"
             + b"\x04\x00\x04\x00\xff\xff\xff\xff" + b"\x10\x00\x04\x00\xff\xff\xff\xff"
             + b"\x20\x00\x00\x00\xff\xff\xff\xff")
# vfs_cap_data revision 2: CAP_NET_BIND_SERVICE permitted and effective.
CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + b"\x00\x00\x00\x00" + b"\x00" * 8


def fx_xattrs(s):
    for layer in (0, "u"):
        s.file(layer, f"{layer}-file", "x\n", xattrs=[("user.one", b"1"), ("user.two", b"")])
        s.dir(layer, f"{layer}-dir", xattrs=[("user.dir", b"d"), ("trusted.mine", b"t")])
        s.file(layer, f"{layer}-cap", "c\n", 0o755, xattrs=[("security.capability", CAPABILITY)])
        s.file(layer, f"{layer}-big", "b\n", xattrs=[("user.big", b"v" * 4000)])
        s.file(layer, f"{layer}-many", "m\n",
               xattrs=[(f"user.k{i:02}", f"value {i}".encode()) for i in range(50)])
        try:
            s.file(layer, f"{layer}-acl", "a\n", xattrs=[("system.posix_acl_access", POSIX_ACL)])
        except OSError:
            pass
    s.dir(1, "merged")
    s.file(1, "merged/x", "x\n")
    s.dir(0, "merged", xattrs=[("user.from", b"l0")])
    s.opaque("u", "opq")


XATTR_SCRIPT = """
$PROBE errno getxattr opq trusted.overlay.opaque; $PROBE errno getxattr 0-file user.none
$PROBE errno getxattr 0-file user.one; getfattr -d -m - 0-many 2>&1 | wc -l
"""


def fx_big_dir(s):
    for i in range(10000):
        s.file(1, f"big/f{i:05}", "")
    for i in range(0, 3000):
        s.file(0, f"big/f{i:05}", "over\n")
    for i in range(3000, 4000):
        s.whiteout(0, f"big/f{i:05}")
    for i in range(2000):
        s.file("u", f"big/n{i:05}", "")


def fx_reread(s):
    """The big directory beside 80 small merged ones (more than a daemon keeps listings of)."""
    fx_big_dir(s)
    for i in range(80):
        s.file(1, f"many/d{i:02}/a", "")
        s.file(0, f"many/d{i:02}/b", "")


REREAD_SCRIPT = """
$PROBE dropmid big 1500 many
for r in 1 2; do echo 1 > /proc/sys/vm/drop_caches; ls -f big | sort | md5sum; ls many/d07; done
stat -c '%n %s' big/f00001 big/f02999 big/f03000 big/f05000 big/n01999 2>&1
"""


class ForegroundDaemon:
    """stratafs run in the foreground (`-f`) on stack `s`, its log (RUST_LOG=`log_filter`) in
    a file, for checks that read what the daemon says or measure the process itself."""

    def __init__(self, binary, s, log_filter, extra_opts=""):
        self.mnt, self.log_path = f"{s.top}/m", f"{s.top}/daemon.log"
        opts = common.overlay_opts(s.lowers, "uw/u", "uw/w") + (f",{extra_opts}" if extra_opts else "")
        with open(self.log_path, "w") as err:
            self.proc = subprocess.Popen([binary, "-f", "-o", opts, self.mnt], cwd=s.top,
                                         stderr=err, stdout=subprocess.DEVNULL,
                                         env={**os.environ, "RUST_LOG": log_filter})
        for _ in range(300):
            if common.is_mounted(self.mnt) or self.proc.poll() is not None:
                break
            time.sleep(0.1)

    def mounted(self):
        if common.is_mounted(self.mnt):
            return True
        self.unmount()
        return False

    def cpu_ticks(self):
        """User plus system CPU time of the daemon so far, in clock ticks."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*m", "", f.read())

    def unmount(self):
        """Unmounts (waiting for the daemon to log its exit), or kills it if it hangs."""
        try:
            if common.is_mounted(self.mnt):
                subprocess.run(["umount", self.mnt], check=True)
            self.proc.wait(timeout=30)
        finally:
            common.unmount(self.mnt)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def fx_lookup_counts(s):
    for i in range(3000):
        s.file(1, f"big/f{i:04}", "x" * (i % 13))
    for i in range(0, 1000):
        s.file(0, f"big/f{i:04}", "over\n")
    for i in range(1000, 1300):
        s.whiteout(0, f"big/f{i:04}")
    for i in range(500):
        s.file("u", f"big/n{i:03}", "")
    for layer in (1, 0, "u"):
        s.file(layer, f"nest/a/b/c/from-{layer}", f"{layer}\n")
        s.file(layer, f"nest/a/at-{layer}", f"{layer}\n")


def check_lookup_counts(binary, s):
    """Every READDIRPLUS entry sent is a kernel lookup, every one looked up but not sent is
    released: once the kernel has forgotten everything the daemon holds the root only. Read
    with `ls -l`, `find` and `ls -lR`, caches dropped (FORGETs), the big directory read again
    (a node dropped too early fails here), caches dropped again and unmounted. The last drop
    is needed: at unmount the connection ends before the kernel evicts its inodes, so it
    sends no FORGETs then."""
    mnt = f"{s.top}/m"
    problems = []

    def sh(script):
        p = subprocess.run(["bash", "-c", script], cwd=mnt, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "LC_ALL": "C"}, errors="replace")
        if p.returncode or p.stderr:
            problems.append(f"  {script}: exit={p.returncode} {p.stderr[:300]!r}")
        return p.stdout

    def names_sizes():
        return sorted(sh("ls -ln big | awk 'NR > 1 {print $NF, $5}'").splitlines())

    daemon = ForegroundDaemon(binary, s, "info")
    if not daemon.mounted():
        return [f"  not mounted: {daemon.log()[-500:]!r}"]
    try:
        first = names_sizes()
        if len(first) != 3200:
            problems.append(f"  ls -l big: {len(first)} entries, want 3200")
        sh("find . -printf '%s %i\\n' >/dev/null; ls -lR . >/dev/null")
        sh("sync; echo 2 > /proc/sys/vm/drop_caches")
        if names_sizes() != first:
            problems.append("  ls -l big after drop_caches differs from before")
        try:
            stats = sorted(f"{n} {os.lstat(f'{mnt}/big/{n}').st_size}" for n, _ in
                           (line.split(" ") for line in first))
            if stats != first:
                problems.append("  stat of big/* after drop_caches differs from ls -l before")
        except OSError as e:
            problems.append(f"  stat after drop_caches: {e}")
        sh("sync; echo 2 > /proc/sys/vm/drop_caches")
    finally:
        daemon.unmount()
    nodes = re.findall(r"unmounted.*\bnodes=(\d+)", daemon.log())
    if nodes != ["1"]:
        problems.append(f"  daemon at unmount: nodes={','.join(nodes) or 'not logged'} "
                        "(want 1: the root only)")
    return problems


def check_busy_poll(binary, s):
    """Busy polling (on by default with 2+ CPUs) turns on under a stream of requests and
    off again once they stop, so an idle daemon uses no CPU; `busy_poll=0` never turns it
    on. Two rounds of `ls -lR` (one request per entry at least: the kernel caches no
    xattrs), each followed by a second of idleness in which the daemon may use at most
    0.1 s of CPU (a polling reader would use a whole second), at the end of which the log
    must say polling is off."""
    problems = []
    polls = (os.cpu_count() or 1) >= 2
    for opts, want_polling in (("", polls), ("busy_poll=0", False)):
        label = opts or "default"
        daemon = ForegroundDaemon(binary, s, "info,stratafs::fuse::busy_poll=debug", opts)
        if not daemon.mounted():
            return [f"  {label}: not mounted: {daemon.log()[-500:]!r}"]
        turned_on = 0
        try:
            for rnd in range(1, 3):
                subprocess.run(["ls", "-lR", daemon.mnt], stdout=subprocess.DEVNULL, check=True,
                               timeout=120)
                time.sleep(0.3)
                before = daemon.cpu_ticks()
                time.sleep(1.0)
                idle = (daemon.cpu_ticks() - before) / os.sysconf("SC_CLK_TCK")
                if idle > 0.1:
                    problems.append(f"  {label}, round {rnd}: idle daemon used {idle:.2f} s "
                                    "of CPU in 1 s")
                switches = re.findall(r"busy polling on=(true|false)", daemon.log())
                if not want_polling:
                    if switches:
                        problems.append(f"  {label}: polling switched {switches[:4]} although "
                                        "off")
                    continue
                alternate = all(a != b for a, b in zip(switches, switches[1:]))
                if switches.count("true") <= turned_on or switches[-1:] != ["false"] \
                        or not alternate:
                    problems.append(f"  {label}, round {rnd}: switches so far {switches[-6:]} "
                                    "(want on again during ls -lR, off after it)")
                turned_on = switches.count("true")
        finally:
            daemon.unmount()
    return problems

def fx_readdir(s):
    for layer, n in ((2, 100), (1, 100), (0, 100)):
        for i in range(n):
            s.file(layer, f"merged/{layer}-{i:03}", "")
    for i in range(0, 100, 3):
        s.whiteout(0, f"merged/2-{i:03}")
    for i in range(200):
        s.file("u", f"updir/{i:03}", "")
        s.file(0, f"lowdir/{i:03}", "")
    for i in range(100):
        s.file(1, f"mixed/{i:03}", "")
        s.file("u", f"mixed/u{i:03}", "")
    for d in ("merged", "updir", "lowdir", "mixed"):
        s.dir("u" if d in ("updir", "mixed") else 0, f"{d}/subdir")


def fx_dots(s):
    s.dir(1, "merged/nested/deeper")
    s.dir(0, "merged/nested/deeper")
    s.dir("u", "merged/nested")
    s.dir(0, "lowonly/inner")
    s.dir("u", "uponly/inner")


def fx_content(s):
    import random
    rnd = random.Random(7)
    s.file(0, "big", bytes(rnd.getrandbits(8) for _ in range(1 << 20)) * 8)
    p = s.path(1, "sparse")
    with open(p, "wb") as f:
        f.write(b"D" * 65536)
        f.seek(4 << 20)
        f.write(b"E" * 65536)
        f.truncate(8 << 20)
    s.file("u", "upper-big", b"U" * (3 << 20))


def fx_names(s):
    for layer in (0, "u"):
        s.file(layer, f"{layer} with spaces", "s\n")
        s.file(layer, f"{layer}-new\nline", "n\n")
        s.file(layer, os.fsdecode(f"{layer}-bytes-".encode() + b"\xff\xfe"), "b\n")
        s.file(layer, f"-{layer}-dash", "d\n")
        s.file(layer, f"{layer}-ünïcødé-名前", "u\n")
    s.file(1, os.fsdecode(b"gone-\xff"), "g\n")
    s.whiteout(0, os.fsdecode(b"gone-\xff"))


def fx_redirects(s):
    """Directories renamed by kernel overlayfs with redirect_dir=on (built alike for both)."""
    s.dir(0, "old/sub")
    s.file(0, "old/sub/f", "f\n")
    s.file(0, "old/g", "g\n")
    s.dir("u", "new")
    os.setxattr(s.path("u", "new"), "trusted.overlay.redirect", b"old")
    s.file("u", "new/added", "added\n")
    s.whiteout("u", "old")
    s.dir(1, "b/orig")
    s.file(1, "b/orig/x", "x\n")
    s.dir(0, "b")
    s.dir("u", "a/moved")
    os.setxattr(s.path("u", "a/moved"), "trusted.overlay.redirect", b"/b/orig")
    s.dir("u", "b")
    s.whiteout("u", "b/orig")
    s.dir(1, "r1")
    s.file(1, "r1/y", "y\n")
    s.dir(0, "r2")
    os.setxattr(s.path(0, "r2"), "trusted.overlay.redirect", b"r1")
    s.whiteout(0, "r1")


def fx_metacopy(s):
    """Metadata-only copy-ups as kernel overlayfs writes them (metacopy=on), built alike."""
    data = "data of f\n" * 100
    s.file(0, "f", data, 0o644)
    p = s.path("u", "f")
    with open(p, "wb") as f:
        f.truncate(len(data))
    os.chmod(p, 0o600)
    os.setxattr(p, "trusted.overlay.metacopy", b"")
    s.file(1, "sub/orig", "original data\n")
    p = s.path("u", "renamed")
    with open(p, "wb") as f:
        f.truncate(len("original data\n"))
    os.chmod(p, 0o640)
    os.setxattr(p, "trusted.overlay.metacopy", b"")
    os.setxattr(p, "trusted.overlay.redirect", b"/sub/orig")
    s.whiteout("u", "sub/orig")
    # The kernel writes metacopy files into impure directories (it also records an origin):
    # only there does its readdir report the same d_ino as stat.
    os.setxattr(s.root("u"), "trusted.overlay.impure", b"y")


def fx_empty_layers(s):
    small_tree(s, 2)


def fx_nested(s):
    for layer in (2, 1, 0, "u"):
        for depth in range(1, 6):
            s.file(layer, "/".join(["n"] * depth) + f"/at-{layer}-{depth}", f"{layer}\n")
    s.whiteout(0, "n/n/at-2-2")
    s.opaque(1, "n/n/n/n")
    s.file(1, "n/n/n/n/only-1", "1\n")
    s.whiteout("u", "n/n/n/at-0-3")


def fx_separate_fs(s):
    for layer in (1, 0, "u"):
        small_tree(s, layer, f"{layer}-")
        s.file(layer, f"shared/{layer}", "x\n")
    s.file(1, "hl/a", "a\n")
    s.link(1, "hl/b", "hl/a")


def fx_upper_root_opaque(s):
    small_tree(s, 0)
    s.file("u", "up", "u\n")
    os.setxattr(s.root("u"), "trusted.overlay.opaque", b"y")


# ---------------------------------------------------------------- scenarios

RO_WRITES = """
for op in create mkdir mknod symlink; do $PROBE errno $op new-$op; done
for op in open_w open_rw open_trunc truncate chmod chown utime setxattr unlink; do $PROBE errno $op a; done
$PROBE errno removexattr a user.none; $PROBE errno rmdir emptydir; $PROBE errno rename a a2
$PROBE errno link a a3; $PROBE errno chmod d; $PROBE errno setxattr d; $PROBE errno open_r a
"""

ERRNO_SCRIPT = """
$PROBE errno stat missing; $PROBE errno stat a/child; $PROBE errno opendir a; $PROBE errno readlink a
$PROBE errno open_w d; $PROBE errno getxattr a user.missing; $PROBE errno rmdir d
$PROBE errno unlink d; $PROBE errno rmdir a; $PROBE errno mkdir d; $PROBE errno create_excl a
$PROBE errno link d dlink; $PROBE errno rename d d/e/inside; $PROBE errno listdir missing
$PROBE errno open_dir a; $PROBE errno access_x a; $PROBE errno access_r b
"""

NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"
ACCESS_SCRIPT = f"""
{NOBODY} $PROBE errno read a; {NOBODY} $PROBE errno read b; {NOBODY} $PROBE errno opendir emptydir
{NOBODY} $PROBE errno access_w a; {NOBODY} $PROBE errno access_x d/e/f; {NOBODY} $PROBE errno read d/e/f
{NOBODY} $PROBE errno create d/new; {NOBODY} $PROBE errno unlink a; {NOBODY} $PROBE errno stat emptydir/x
"""


def scenarios():
    out = [
        Scenario("upper-only", fx_upper_only, "ls -lA | tail -n +2 | awk '{print $1, $NF}'"),
        Scenario("lower-only", fx_lower_only, "cat a d/e/f; readlink s"),
        Scenario("lower-only-readonly", fx_lower_only_ro, RO_WRITES, upper=False,
                 kernel_opts=""),
        Scenario("file-override", fx_file_override, "cat f g h; stat -c '%n %a %u:%g %s' f g h"),
        Scenario("merged-dirs", fx_merged_dirs, "ls -A d d/sub; stat -c '%n %h %a' d d/sub lowdir updir",
                 nlower=3),
        Scenario("type-mix", fx_type_mix, "ls -A x y z w v/ mid/; cat x w y/child"),
        Scenario("xattr-whiteouts", fx_xattr_whiteouts, "ls -A d", whiteout="xattr"),
        Scenario("deep-120-layers", fx_deep, "cat chain; ls common | wc -l; cat deep/a/b/c/file; ls op",
                 nlower=120),
        Scenario("deep-500-layers", fx_layer_per_file, "ls d | wc -l; cat d/f000 d/f499",
                 nlower=500),
        Scenario("long-names", fx_long_names, LONG_SCRIPT),
        Scenario("special-files", fx_special, SPECIAL_SCRIPT),
        Scenario("modes-owners", fx_modes_owners, "stat -c '%n %A %u %g' 0/* u/*"),
        Scenario("hardlinks", fx_hardlinks, "stat -c '%n %h' a sub/b c x y p r t; $PROBE errno stat q"),
        Scenario("xattrs", fx_xattrs, XATTR_SCRIPT),
        Scenario("big-dir-10k", fx_big_dir, "ls big | wc -l; ls -f big | sort | md5sum; $PROBE seek big"),
        Scenario("listings-reread-after-cache-drop", fx_reread, REREAD_SCRIPT),
        Scenario("readdirplus-lookup-counts", fx_lookup_counts, check=check_lookup_counts),
        Scenario("busy-poll-on-and-off", fx_lookup_counts, check=check_busy_poll),
        Scenario("readdir-seekdir", fx_readdir,
                 "for d in merged updir lowdir mixed .; do $PROBE seek $d; done", nlower=3),
        Scenario("readdir-interleaved-unlink", fx_readdir,
                 "for d in merged updir lowdir mixed; do $PROBE interleave $d 50; done", nlower=3,
                 times=False),
        Scenario("dot-and-dotdot", fx_dots,
                 "for d in . merged merged/nested merged/nested/deeper lowonly lowonly/inner uponly "
                 "uponly/inner; do $PROBE dots $d; done"),
        Scenario("inode-stability", fx_merged_dirs,
                 "$PROBE stable d d/from-2 d/from-u d/common d/sub d/sub/inner/x lowdir/a updir/b",
                 nlower=3),
        Scenario("statfs-upper", fx_lower_only, '$PROBE statfs . "$TOP/uw/u"'),
        Scenario("statfs-readonly", fx_lower_only_ro, '$PROBE statfs . "$TOP/l/0"', upper=False,
                 kernel_opts=""),
        Scenario("permissions-as-nobody", fx_lower_only, ACCESS_SCRIPT),
        Scenario("errnos", fx_lower_only, ERRNO_SCRIPT),
        Scenario("content-sparse-mmap", fx_content,
                 "$PROBE holes sparse; $PROBE mmap big; $PROBE mmap upper-big; stat -c '%n %s %b' sparse big"),
        Scenario("odd-names", fx_names, "ls -A | od -c | md5sum"),
        Scenario("empty-layers", fx_empty_layers, "ls -A", nlower=3),
        Scenario("nested-merges", fx_nested, "find . | sort", nlower=3),
        Scenario("layers-on-separate-filesystems", fx_separate_fs, "ls -A", separate_fs=True,
                 kernel_opts=KERNEL_OPTS + ",xino=on"),
        Scenario("layers-named-by-symlinks", fx_merged_dirs, "ls -A d", nlower=3,
                 symlinked_layers=True),
        Scenario("upper-root-opaque", fx_upper_root_opaque, "ls -A"),
        Scenario("redirects", fx_redirects, "ls -A new a/moved r2; cat new/sub/f a/moved/x r2/y"),
        Scenario("redirects-nofollow", fx_redirects, "ls -A new a/moved r2",
                 kernel_opts="redirect_dir=nofollow", strata_opts="redirect_dir=nofollow"),
        Scenario("metacopy", fx_metacopy, "cat f renamed | md5sum; stat -c '%n %a %s' f renamed"),
    ]
    for wh in ("chardev", "wh", "xattr"):
        out.append(Scenario(f"whiteouts-{wh}", fx_whiteouts, WHITEOUT_SCRIPT, whiteout=wh))
    for wh in ("chardev", "wh"):
        out.append(Scenario(f"whiteout-names-{wh}", fx_whiteout_names, "ls -A . a/b/c", whiteout=wh))
    for opq in ("trusted", "user", "fuseoverlayfs", "wh"):
        out.append(Scenario(f"opaque-{opq}", fx_opaque, OPAQUE_SCRIPT, opaque=opq))
    out.append(Scenario("mixed-encodings", fx_mixed_encodings, "ls -A d o0 o1 o2", nlower=4,
                        whiteout="mixed", opaque="mixed"))
    for wh, opq in (("wh", "wh"), ("chardev", "trusted")):
        out.append(Scenario(f"long-names-{wh}", fx_long_names, LONG_SCRIPT, whiteout=wh, opaque=opq))
    return out


# ---------------------------------------------------------------- running

def run_one(binary, tmp, sc):
    if sc.check:
        stack = Stack(f"{tmp}/s", sc, False)
        sc.build(stack)
        stack.finish()
        return sc.check(binary, stack)
    k, s = f"{tmp}/k", f"{tmp}/s"
    for top, kernel in ((k, True), (s, False)):
        stack = Stack(top, sc, kernel)
        sc.build(stack)
        stack.finish()
        if kernel:
            lowers = stack.lowers
    upper, work = ("uw/u", "uw/w") if sc.upper else (None, None)
    mk, ms = f"{k}/m", f"{s}/m"
    problems = []
    try:
        common.mount_kernel(lowers, upper, work, mk, sc.kernel_opts, cwd=k)
        common.mount_strata(binary, lowers, upper, work, ms, sc.strata_opts, cwd=s)
        out_k = common.run_ops(mk, sc.script, env={"TOP": k}).replace(k, "TOP")
        out_s = common.run_ops(ms, sc.script, env={"TOP": s}).replace(s, "TOP")
        if out_k != out_s:
            problems.append(f"  output: kernel={out_k!r}\n          stratafs={out_s!r}")
        snap_k = common.snapshot(mk, times=sc.times, inodes=True)
        snap_s = common.snapshot(ms, times=sc.times, inodes=True)
        problems += common.diff(snap_k, snap_s, "merged")
    finally:
        common.unmount(mk)
        common.unmount(ms)
    if sc.upper and sc.alike():
        def layers(top):
            return {f"l{i}": f"{top}/l/{i}" for i in range(sc.nlower)}
        up_k = common.snapshot(f"{k}/uw/u", common.handle_map(layers(k)), times=False)
        up_s = common.snapshot(f"{s}/uw/u", common.handle_map(layers(s)), times=False)
        problems += common.diff(common.scrub_mtimes(up_k), common.scrub_mtimes(up_s), "upper")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--filter", default="")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    todo = [sc for sc in scenarios() if args.filter in sc.name]
    if args.list:
        for sc in todo:
            print(sc.name)
        print(f"{len(todo)} scenarios")
        return 0
    if not common.can_run(args.binary):
        print("read suite needs root, /dev/fuse and the stratafs binary")
        print(f"0 passed, {len(todo)} failed")
        return 1
    binary = os.path.abspath(args.binary)  # the daemons start in the fixture's directory
    failed = common.run_suite("read suite", todo, lambda tmp, sc: run_one(binary, tmp, sc))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
