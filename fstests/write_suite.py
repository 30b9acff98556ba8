#!/usr/bin/env python3
"""Write-side differential suite: every operation on every placement of its target, on kernel
overlayfs and on stratafs, compared.

Why: the write side (copy-up, whiteouts, opaque directories, redirects, metacopy) must leave
exactly what kernel overlayfs leaves, both in the merged view and in the upper layer, and the
two must be able to read each other's upper layers. Each scenario

  1. builds the same layer fixture twice (two lowers and an upper, kernel encodings),
  2. mounts kernel overlayfs (redirect_dir=on,metacopy=on: the features stratafs writes by
     default) on one copy and stratafs on the other,
  3. runs the same shell snippet on both (stdout, stderr and exit codes are compared after the
     mount paths are normalised),
  4. compares the merged trees (type, mode, owner, size, link count, content, symlink target,
     xattrs), then the upper layers (same, with overlay.origin decoded to the lower path it
     names and overlay.uuid's random value masked),
  5. swaps: kernel overlayfs mounts stratafs's upper and stratafs mounts the kernel's, and both
     must show the same merged tree as before.

Usage: python3 fstests/write_suite.py [--binary PATH] [--filter SUBSTR] [-v] [--list]
Ends with the line "N passed, M failed".
"""

import argparse
import dataclasses
import os
import shutil
import stat
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import diff, run_ops, scrub_mtimes, snapshot, unmount  # noqa: E402

KERNEL_OPTS = "redirect_dir=on,metacopy=on,index=on"
STRATA_OPTS = ""
# Rootless (--rootless, run inside a user namespace): no trusted.* xattrs, so the kernel needs
# userxattr, which implies no redirects, no metacopy and no index; stratafs gets the same.
ROOTLESS_KERNEL_OPTS = "userxattr"
ROOTLESS_STRATA_OPTS = "redirect_dir=nofollow,metacopy=off"
XATTR_NS = "trusted"


# ---------------------------------------------------------------- fixtures

def _mk(root, rel, content="", mode=0o644):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(content)
    os.chmod(p, mode)


def _dir(root, rel, mode=0o755):
    p = os.path.join(root, rel)
    os.makedirs(p, exist_ok=True)
    os.chmod(p, mode)


def _chattr(root, rel, flags):
    subprocess.run(["chattr", flags, os.path.join(root, rel)], stderr=subprocess.DEVNULL,
                   check=False)


def _whiteout(root, rel):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _opaque(root, rel):
    _dir(root, rel)
    os.setxattr(os.path.join(root, rel), f"{XATTR_NS}.overlay.opaque", b"y")


def base_fixture(top):
    """Two lower layers and an upper with a bit of everything; placements are named by the
    target they offer."""
    l1, l2, u = (os.path.join(top, n) for n in ("l1", "l2", "u"))
    for d in (l1, l2, u, os.path.join(top, "w")):
        os.makedirs(d, exist_ok=True)
    # lower only (bottom layer) / middle layer over bottom / upper over lower / upper only
    _mk(l2, "lower/f", "lower file\n")
    _mk(l2, "lower/big", "B" * 200000)
    _dir(l2, "lower/d")
    _mk(l2, "lower/d/child", "child\n")
    os.symlink("f", os.path.join(l2, "lower/sym"))
    os.mkfifo(os.path.join(l2, "lower/fifo"))
    _mk(l2, "mid/f", "bottom\n")
    _mk(l1, "mid/f", "middle\n")
    # Inode flags a copy-up carries over (sync, noatime) and one it does not (nodump); where
    # the filesystem has none, both mounts show none.
    _chattr(l1, "mid/f", "+SAd")
    _chattr(l2, "lower/d", "+Ad")
    _dir(l2, "mid/d")
    _mk(l2, "mid/d/a", "a\n")
    _dir(l1, "mid/d")
    _mk(l1, "mid/d/b", "b\n")
    _mk(l2, "both/f", "lower version\n")
    _mk(u, "both/f", "upper version\n")
    _dir(l2, "both/d")
    _mk(l2, "both/d/low", "low\n")
    _dir(u, "both/d")
    _mk(u, "both/d/up", "up\n")
    _mk(u, "upper/f", "upper only\n")
    _dir(u, "upper/d")
    _mk(u, "upper/d/x", "x\n")
    _dir(l2, "upper")
    # a name deleted in the middle layer (whiteout) and a replaced (opaque) directory
    _mk(l2, "wh/f", "hidden\n")
    _whiteout(l1, "wh/f")
    _dir(l2, "wh/d")
    _mk(l2, "wh/d/gone", "gone\n")
    _whiteout(l1, "wh/d")
    _dir(l2, "opq/d")
    _mk(l2, "opq/d/old", "old\n")
    _opaque(l1, "opq/d")
    _mk(l1, "opq/d/f", "in opaque dir\n")
    # lower hard links
    _mk(l2, "hl/f", "linked\n")
    os.link(os.path.join(l2, "hl/f"), os.path.join(l2, "hl/g"))
    # special modes and owners
    _mk(l2, "own/f", "owned\n", 0o4755)
    os.chown(os.path.join(l2, "own/f"), 1234, 5678)
    _dir(l2, "own/sticky", 0o1777)
    _dir(l2, "own/sgid", 0o2775)
    os.chown(os.path.join(l2, "own/sgid"), 0, 4321)
    _mk(l2, "own/sgid/f", "sgid\n")
    os.setxattr(os.path.join(l2, "lower/f"), "user.origin", b"lower")
    for layer in (l1, l2, u):
        common.stamp_times(layer)


# ---------------------------------------------------------------- scenarios

# Placements of a target, as (path of the target, path of its parent directory).
FILE_PLACES = {
    "lower": "lower/f",
    "middle": "mid/f",
    "upper-over-lower": "both/f",
    "upper-only": "upper/f",
    "hardlink": "hl/f",
    "in-opaque": "opq/d/f",
    "setuid-owned": "own/f",
    # (setup, target): the target reached through an earlier operation
    "in-renamed-merged-dir": ("mv mid/d mid/dd", "mid/dd/a"),
    "in-lower-dir-moved-away": ("mv lower/d upper/d/moved", "upper/d/moved/child"),
    "renamed-lower-file": ("mv lower/f lower/f.r", "lower/f.r"),
    "recreated-over-whiteout": ("echo recreated > wh/f", "wh/f"),
}
DIR_PLACES = {
    "lower": "lower/d",
    "merged": "mid/d",
    "upper-over-lower": "both/d",
    "upper-only": "upper/d",
    "opaque": "opq/d",
    "renamed-merged": ("mv mid/d mid/dd", "mid/dd"),
    "recreated-over-whiteout": ("mkdir wh/d && touch wh/d/x", "wh/d"),
}
NEW_PLACES = {
    "in-lower-dir": "lower/new",
    "in-merged-dir": "mid/d/new",
    "in-upper-dir": "upper/d/new",
    "over-whiteout": "wh/f",
    "over-whiteout-dir": "wh/d",
    "in-opaque-dir": "opq/d/new",
    "in-sgid-dir": "own/sgid/new",
    "in-sticky-dir": "own/sticky/new",
    "in-renamed-dir": ("mv mid/d mid/dd", "mid/dd/new"),
}

# Only regular files are read: a fifo would block and a device is refused on a nodev mount.
SHOW = ('stat -c "%n %F %a %u:%g %s %h" {t} 2>&1; '
        'if [ -f {t} ]; then head -c 300 {t} 2>&1; fi; echo')

# Inode flags (FS_IOC_GETFLAGS as lsattr reads them, and FS_IOC_FSGETXATTR's xflags, extent
# size and project id), before and after a copy-up.
LSATTR = ("lsattr -d {t} 2>&1 | cut -c1-22; python3 -c 'import fcntl,os,struct; "
          "b=bytearray(28); fcntl.ioctl(os.open(\"{t}\", os.O_RDONLY), 0x801c581f, b); "
          "print(struct.unpack(\"4I\", b[:16]))'")

# Direct I/O through the daemon's own buffers (see direct_io.py).
DIRECT_IO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "direct_io.py")

FILE_OPS = {
    "append": "echo appended >> {t}",
    "direct-read": f"python3 {DIRECT_IO} {{t}} read",
    "direct-write": f"python3 {DIRECT_IO} {{t}} write",
    "lsattr": f"{LSATTR} && chmod 600 {{t}} && {LSATTR}",
    "overwrite": "printf 'XY' | dd of={t} bs=1 seek=2 conv=notrunc status=none",
    "truncate-shrink": "truncate -s 3 {t}",
    "truncate-grow": "truncate -s 70000 {t}",
    "open-trunc": ": > {t}",
    "open-rdwr-nowrite": "python3 -c 'import os; os.close(os.open(\"{t}\", os.O_RDWR))'",
    "chmod": "chmod 600 {t}",
    "chown": "chown 42:43 {t}",
    "utimes": "touch -d '2010-01-02 03:04:05' {t}",
    "setxattr": "setfattr -n user.k -v val {t}",
    "removexattr": "setfattr -n user.k -v val {t} && setfattr -x user.k {t}",
    "unlink": "rm {t}",
    "rename-samedir": "mv {t} {t}.renamed",
    "rename-otherdir": "mv {t} upper/d/moved",
    "rename-over-lower-file": "mv {t} lower/f2 2>&1; mv {t} mid/f 2>&1",
    "link": "ln {t} {t}.link",
    "link-then-write": "ln {t} {t}.link && echo via-link >> {t}.link",
    "link-then-unlink-link": "ln {t} {t}.link && rm {t}.link",
    "link-then-unlink-first": "ln {t} {t}.link && rm {t} && cat {t}.link",
    "chmod-then-append": "chmod 640 {t} && echo more >> {t}",
    "chmod-then-rename-then-append": "chmod 640 {t} && mv {t} {t}.mv && echo more >> {t}.mv",
    "fallocate": "fallocate -l 100000 {t}",
    "punch-hole": "fallocate -l 100000 {t} && fallocate -p -o 4096 -l 8192 {t}",
    "rename-noreplace-exists": "python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); r=l.renameat2(-100,b\"{t}\",-100,b\"lower/f\",1); print(r, os.strerror(ctypes.get_errno()) if r else \"\")'",
    "rename-exchange": "python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); r=l.renameat2(-100,b\"{t}\",-100,b\"upper/f\",2); print(r, os.strerror(ctypes.get_errno()) if r else \"\")'",
    "rename-whiteout-flag": "python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); r=l.renameat2(-100,b\"{t}\",-100,b\"{t}.w\",4); print(r, os.strerror(ctypes.get_errno()) if r else \"\")'",
    "mmap-shared-write": "python3 -c 'import mmap,os; fd=os.open(\"{t}\", os.O_RDWR); m=mmap.mmap(fd, 4); m[0:2]=b\"MM\"; m.flush(); m.close(); os.close(fd)'",
    "flock-and-posix-lock": "python3 -c 'import fcntl,os; fd=os.open(\"{t}\", os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, b\"L\"); pid=os.fork(); exec(\"if pid == 0:\\n  fd2=os.open(\\\"{t}\\\", os.O_RDWR)\\n  try: fcntl.lockf(fd2, fcntl.LOCK_EX|fcntl.LOCK_NB); print(\\\"got lock\\\")\\n  except OSError as e: print(\\\"lock busy\\\", e.errno)\\n  os._exit(0)\"); os.waitpid(pid, 0) if pid else None'",
    "touch-mtime-only": "touch -m -d '2012-03-04' {t} && stat -c '%y' {t} | cut -c1-4",
    "touch-atime-only": "touch -a -d '2012-03-04' {t} && stat -c '%x %y' {t} | cut -c1-4,37-40",
    "setfacl": "setfacl -m u:1000:r {t} && getfacl -cp {t}",
    "setfacl-then-chmod": "setfacl -m u:1000:rw {t} && chmod 604 {t} && getfacl -cp {t}",
    "acl-denies-other-user": "chmod 644 {t} && setfacl -m u:1000:- {t} && setpriv --reuid=1000 --regid=1000 --clear-groups head -c 3 {t} 2>&1 | sed 's/^head: //'; setpriv --reuid=1001 --regid=1001 --clear-groups head -c 3 {t} 2>&1 | sed 's/^head: //'",
    "unlink-open-fstat": "python3 -c 'import os; fd=os.open(\"{t}\", os.O_RDWR); os.unlink(\"{t}\"); os.write(fd,b\"z\"); s=os.fstat(fd); print(s.st_nlink, s.st_size)'",
}

DIR_OPS = {
    "lsattr": f"{LSATTR} && touch {{t}}/new && {LSATTR}",
    "rmdir-nonempty": "rmdir {t} 2>&1",
    "rm-rf": "rm -rf {t}",
    "rm-rf-mkdir": "rm -rf {t} && mkdir {t} && ls -A {t}; ls {t}/child {t}/a {t}/low {t}/f 2>&1",
    "rm-rf-mkdir-touch": "rm -rf {t} && mkdir {t} && touch {t}/new && ls -A {t}",
    "rename-samedir": "mv {t} {t}.mv && ls -A {t}.mv",
    "rename-otherdir": "mv {t} upper/d/moved && ls -A upper/d/moved",
    "rename-then-modify": "mv {t} {t}.mv && touch {t}.mv/added && rm -f {t}.mv/a {t}.mv/low {t}.mv/child && ls -A {t}.mv",
    "rename-twice": "mv {t} {t}.1 && mv {t}.1 upper/{t2} && ls -A upper/{t2}",
    "chmod": "chmod 700 {t}",
    "chown": "chown 7:8 {t}",
    "utimes": "touch -d '2011-01-01' {t}",
    "setxattr": "setfattr -n user.dir -v 1 {t}",
    "create-child": "echo new > {t}/newchild && ls -A {t}",
    "mkdir-child": "mkdir {t}/sub && ls -A {t}",
    "unlink-children": "find {t} -mindepth 1 -maxdepth 1 -type f -delete && ls -A {t}",
    "rename-over-empty-dir": "mkdir -p upper/empty && mv {t} upper/empty 2>&1; ls -A upper/empty 2>&1",
    "rename-exchange-with-file": "python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); r=l.renameat2(-100,b\"{t}\",-100,b\"lower/f\",2); print(r, os.strerror(ctypes.get_errno()) if r else \"\")'",
}

NEW_OPS = {
    "create": "echo created > {t}",
    "mkdir": "mkdir {t} && ls -A {t}",
    "mkfifo": "mkfifo -m 640 {t}",
    "mknod-chr": "mknod -m 600 {t} c 1 3",
    "symlink": "ln -s /some/target {t}",
    "link-lower": "ln lower/f {t}",
    "create-excl-twice": "python3 -c 'import os; os.close(os.open(\"{t}\", os.O_CREAT|os.O_EXCL|os.O_WRONLY, 0o640))' && python3 -c 'import os; os.open(\"{t}\", os.O_CREAT|os.O_EXCL|os.O_WRONLY)' 2>&1 | tail -1",
    "mkdir-setgid-mode": "mkdir -m 2750 {t}",
    "create-under-default-acl": "setfacl -d -m u:1000:rwx -m o::- $(dirname {t}) && (umask 022; echo x > {t}; mkdir {t}.d) && getfacl -cp {t} {t}.d",
}


def scenarios():
    out = []
    for kind, places, ops in (("file", FILE_PLACES, FILE_OPS), ("dir", DIR_PLACES, DIR_OPS),
                              ("new", NEW_PLACES, NEW_OPS)):
        for (pname, place) in places.items():
            setup, path = place if isinstance(place, tuple) else ("", place)
            t2 = path.replace("/", "_")
            for (oname, op) in ops.items():
                script = op.format(t=path, t2=t2) + "; " + SHOW.format(t=path)
                if setup:
                    script = f"{setup} && {{ {script}; }}"
                out.append((f"{kind}/{oname}@{pname}", script))
    # Lower hard links: with index=on (the default of both here) they stay one file after
    # one name is copied up; with index=off the copied name breaks away.
    path = FILE_PLACES["hardlink"]
    for (oname, op) in INDEX_OPS.items():
        script = op + "; " + SHOW.format(t=path) + "; " + SHOW.format(t="hl/g")
        out.append((f"file/{oname}@hardlink", script))
    for (oname, op) in list(FILE_OPS.items()) + list(INDEX_OPS.items()):
        script = op.format(t=path) + "; " + SHOW.format(t=path) + "; " + SHOW.format(t="hl/g")
        out.append((f"file/{oname}@hardlink-noindex", script))
    return out


# Operations on more than one name of a lower hard link.
INDEX_OPS = {
    "write-both-names": "echo one >> hl/f && echo two >> hl/g && cat hl/f",
    "unlink-other-name": "chmod 600 hl/f && rm hl/g && stat -c %h hl/f",
    "unlink-both-names": "chmod 600 hl/f && rm hl/g hl/f && ls hl",
    "rename-other-name": "chmod 600 hl/f && mv hl/g hl/g2 && stat -c %h hl/g2 && echo x >> hl/g2",
    "link-other-name": "chmod 600 hl/f && ln hl/g hl/g3 && stat -c %h hl/f hl/g hl/g3",
    "rename-over-other-name": "chmod 600 hl/f && mv upper/f hl/g && stat -c %h hl/f",
    "same-inode": "chmod 600 hl/f && [ $(stat -c %i hl/f) = $(stat -c %i hl/g) ] && echo same",
    # The exchanged name is not the one the shared inode was first looked up by.
    "exchange-other-name": "chmod 600 hl/f && python3 -c 'import ctypes; print(ctypes.CDLL(None).renameat2(-100, b\"lower/f\", -100, b\"hl/g\", 2))' && echo W >> hl/g && echo V >> lower/f && cat hl/f hl/g lower/f",
    "exchange-new-link": "ln hl/f hl/h && python3 -c 'import ctypes; print(ctypes.CDLL(None).renameat2(-100, b\"upper/f\", -100, b\"hl/h\", 2))' && echo W >> hl/h && echo V >> upper/f && cat hl/f hl/h upper/f",
}


# ---------------------------------------------------------------- mounts

def lowers(top):
    return [f"{top}/l1", f"{top}/l2"]


def mount_kernel(top, upper, work, mnt, opts):
    common.mount_kernel(lowers(top), upper, work, mnt, opts)


def mount_strata(binary, top, upper, work, mnt, opts=""):
    common.mount_strata(binary, lowers(top), upper, work, mnt, opts)


def handle_map(top):
    return common.handle_map({"l1": f"{top}/l1", "l2": f"{top}/l2"})


def without_impure(snap):
    """A known difference, rootless only: the kernel gives a new hard link to a copied-up
    file a fresh inode with the upper number (no decodable origin), so listing the directory
    drops its impure mark; stratafs shows the link as the same inode (the copy-up's number)
    and keeps the mark. The merged views agree; only this xattr is left out."""
    return {k: " ".join(w for w in v.split() if "overlay.impure=" not in w)
            for k, v in snap.items()}


def run_scenario(binary, tmp, name, script, verbose):
    index = name.endswith("@hardlink")
    noindex = name.endswith("@hardlink-noindex")
    kopts, sopts = (KERNEL_OPTS, STRATA_OPTS)
    if noindex and "index=on" in KERNEL_OPTS:
        kopts, sopts = KERNEL_OPTS.replace("index=on", "index=off"), "index=off"
    k = os.path.join(tmp, "k")
    s = os.path.join(tmp, "s")
    problems = []
    for top in (k, s):
        base_fixture(top)
        os.makedirs(os.path.join(top, "m"))
    mk, ms = os.path.join(k, "m"), os.path.join(s, "m")
    try:
        mount_kernel(k, f"{k}/u", f"{k}/w", mk, kopts)
        mount_strata(binary, s, f"{s}/u", f"{s}/w", ms, sopts)
        out_k = run_ops(mk, script)
        out_s = run_ops(ms, script)
        if out_k != out_s:
            problems.append(f"  output: kernel={out_k!r}\n          stratafs={out_s!r}")
        merged_k, merged_s = scrub_mtimes(snapshot(mk)), scrub_mtimes(snapshot(ms))
        problems += diff(merged_k, merged_s, "merged")
    finally:
        unmount(mk)
        unmount(ms)
    if not index:
        # With index=on the kernel links up each name written through (its dentries know
        # their names; FUSE writes name no name) and keeps metadata-only index copies: the
        # upper layouts differ while the merged views and the interoperability must not.
        upper_k = scrub_mtimes(snapshot(f"{k}/u", handle_map(k)))
        upper_s = scrub_mtimes(snapshot(f"{s}/u", handle_map(s)))
        if XATTR_NS == "user" and name.startswith("new/link-lower@"):
            upper_k, upper_s = without_impure(upper_k), without_impure(upper_s)
        problems += diff(upper_k, upper_s, "upper")
    # Interoperability: each mounts the other's upper layer.
    if not problems:
        for top in (k, s):
            # Temporaries go; the index (index=on) belongs with the upper layer.
            shutil.rmtree(f"{top}/w/work", ignore_errors=True)
        for attempt in (1, 2):
            try:
                mount_kernel(s, f"{s}/u", f"{s}/w", ms, kopts)
                mount_strata(binary, k, f"{k}/u", f"{k}/w", mk, sopts)
                cross_k, cross_s = scrub_mtimes(snapshot(ms)), scrub_mtimes(snapshot(mk))
                # Seen once under load: a snapshot of the bare mount point, the mount gone.
                # That says nothing about the layers: try again, then report it as such.
                gone = [m for m, t in ((ms, "overlay"), (mk, "fuse.stratafs"))
                        if common.fstype(m) != t]
                if gone and attempt == 1:
                    continue
                if gone:
                    problems.append(f"  interop mounts vanished during the snapshot: {gone}")
                    break
                problems += diff(merged_k, cross_k, "kernel-on-stratafs-upper")
                problems += diff(merged_k, cross_s, "stratafs-on-kernel-upper")
                break
            except subprocess.CalledProcessError as e:
                problems.append(f"  interop mount failed: {e.stderr}")
                break
            finally:
                unmount(mk)
                unmount(ms)
    if verbose and not problems:
        print(f"  {out_k.strip()}")
    return problems


def in_user_namespace():
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]


@dataclasses.dataclass
class Scenario:
    name: str
    script: str


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--filter", default="")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--rootless", action="store_true",
                    help="run in a user namespace (re-executes through fstests/userns.py)")
    args = ap.parse_args()
    if args.rootless:
        if not in_user_namespace():
            helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "userns.py")
            return subprocess.run([sys.executable, helper, sys.executable] + sys.argv).returncode
        global KERNEL_OPTS, STRATA_OPTS, XATTR_NS
        KERNEL_OPTS, STRATA_OPTS, XATTR_NS = ROOTLESS_KERNEL_OPTS, ROOTLESS_STRATA_OPTS, "user"
    todo = [Scenario(n, s) for (n, s) in scenarios() if args.filter in n]
    if args.list:
        for sc in todo:
            print(sc.name)
        print(f"{len(todo)} scenarios")
        return 0
    if not common.can_run(args.binary):
        print("write suite needs root, /dev/fuse and the stratafs binary")
        print(f"0 passed, {len(todo)} failed")
        return 1
    failed = common.run_suite(
        "write suite (rootless)" if args.rootless else "write suite", todo,
        lambda tmp, sc: run_scenario(args.binary, tmp, sc.name, sc.script, args.verbose))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
