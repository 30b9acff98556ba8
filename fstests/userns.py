#!/usr/bin/env python3
"""Runs a command as root of a new user namespace (identity-mapped uids and gids 0-65535) with
a private mount namespace: the rootless case, made from a root shell.

Why: stratafs must behave in a user namespace as the kernel does there (no trusted.* xattrs,
so user.overlay.* markers; kernel overlayfs with `userxattr`), and these machines reach that
case only from root. newuidmap would need /etc/subuid entries; a privileged parent can write
the maps itself.

Usage: python3 fstests/userns.py COMMAND [ARG...]   (exits with the command's status)
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
RANGE = 65536

libc = ctypes.CDLL(None, use_errno=True)


def child(cmd, ready_w, go_r):
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        os.write(ready_w, b"!")
        sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
    os.write(ready_w, b"x")
    if os.read(go_r, 1) != b"x":
        sys.exit("user namespace maps were not written")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit(f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}")
    os.execvp(cmd[0], cmd)


def main(cmd):
    if not cmd:
        sys.exit(__doc__)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child(cmd, ready_w, go_r)
    if os.read(ready_r, 1) != b"x":
        os.waitpid(pid, 0)
        sys.exit(1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 {RANGE}\n")
    os.write(go_w, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
