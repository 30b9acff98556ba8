#!/usr/bin/env python3
"""POSIX permission and ownership conformance, in the spirit of pjdfstest: every operation
(chmod, chown, link, mkdir, mkfifo, mknod, open, rename, rmdir, symlink, truncate, unlink,
utimensat, ftruncate, posix_fallocate) as root, as the objects' owner (uid 1000) and as
another user (uid 2000), through a fresh mount each time. A case records the errno (or
success) and the resulting metadata of the objects involved.

The objects live in one of three places ("layers"), because an overlay takes a different code
path for each and each has had its own permission bugs:
  lower       the tree is in the lower layer (the operation triggers the copy-up);
  upper       the tree is created through the mount (new objects, only in the upper layer);
  copied-up   the tree is in the lower layer and was copied up before the operation (files
              opened for write and closed, directories given a user.* xattr; the oracle gets
              the same treatment, which changes none of the compared metadata).
and each matrix is run twice: as root of the initial namespace, and rootless, i.e. the union
mounted by root of a user namespace (fstests/userns.py: ids 0-65535 identity-mapped; kernel
overlayfs with `userxattr`, stratafs and fuse-overlayfs as FUSE mounts of that namespace)
with the operations run by that root and by the mapped uids 1000 and 2000. Rootless is how
podman uses fuse-overlayfs, and the FUSE daemons pick their mount options (allow_other,
default_permissions) from their euid there: the options each FUSE target ends up with are
printed as a NOTE.

The oracle is a plain directory with the same tree (the filesystem the layers live on), in
the same namespace: a target passes a case when it gives the plain directory's result.
stratafs must pass every case kernel overlayfs passes; cases where the kernel deviates from
the plain directory too are reported as such (an overlay's copy-up can legitimately differ,
e.g. in link counts).

Usage: python3 fstests/posix_suite.py [--binary PATH] [--targets stratafs,kernel,fuse-overlayfs]
         [--layers lower,upper,copied-up] [--no-rootless] [--ops SUBSTRING]
Ends with "posix: N passed, M failed" for stratafs (failed = cases the kernel passes and
stratafs does not)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OWNER, OTHER = 1000, 2000
CALLERS = {"root": 0, "owner": OWNER, "other": OTHER}


def build(root):
    """The lower tree: d/ (owner's), rootdir/ (root's), st/ (sticky, world-writable)."""
    def mk(rel, mode, uid, content=None, is_dir=False):
        p = os.path.join(root, rel)
        if is_dir:
            os.makedirs(p)
        else:
            with open(p, "w") as f:
                f.write(content or "data")
        os.chown(p, uid, uid)
        os.chmod(p, mode)
        # A fixed mtime: "utimensat set" compares it, also where the tree is made at test time.
        os.utime(p, (1_500_000_000, 1_500_000_000))
    mk("d", 0o755, OWNER, is_dir=True)
    mk("d/f", 0o644, OWNER, "owner file")
    mk("d/ro", 0o444, OWNER)
    mk("d/other", 0o644, OTHER)
    mk("d/sd", 0o755, OWNER, is_dir=True)
    mk("rootdir", 0o755, 0, is_dir=True)
    mk("rootdir/rf", 0o644, 0)
    mk("st", 0o1777, 0, is_dir=True)
    mk("st/f", 0o644, OTHER)
    # Set-id files anyone may write: who writes or truncates decides which bits survive.
    mk("d/sx", 0o6777, OWNER)   # setuid + setgid with group execute
    mk("d/sg", 0o2666, OWNER)   # setgid without group execute (kept for group members)


def _fd_op(path, flags, fn):
    fd = os.open(path, flags)
    try:
        fn(fd)
    finally:
        os.close(fd)


# name -> (operation on base dir b, paths whose state is recorded afterwards)
OPS = {
    "chmod 0600": (lambda b: os.chmod(f"{b}/d/f", 0o600), ["d/f"]),
    "chmod 4755": (lambda b: os.chmod(f"{b}/d/f", 0o4755), ["d/f"]),
    "chown to self": (lambda b: os.chown(f"{b}/d/f", OWNER, OWNER), ["d/f"]),
    "chown uid": (lambda b: os.chown(f"{b}/d/f", OTHER, -1), ["d/f"]),
    "chown gid": (lambda b: os.chown(f"{b}/d/f", -1, OTHER), ["d/f"]),
    "link own file": (lambda b: os.link(f"{b}/d/f", f"{b}/d/f2"), ["d/f", "d/f2"]),
    "link root's file": (lambda b: os.link(f"{b}/rootdir/rf", f"{b}/d/rf2"), ["d/rf2"]),
    "mkdir in d": (lambda b: os.mkdir(f"{b}/d/new", 0o750), ["d/new"]),
    "mkdir in rootdir": (lambda b: os.mkdir(f"{b}/rootdir/new"), ["rootdir/new"]),
    "mkfifo": (lambda b: os.mkfifo(f"{b}/d/fifo", 0o640), ["d/fifo"]),
    "mknod chr 1:3": (lambda b: os.mknod(f"{b}/d/node", 0o600 | 0o020000, os.makedev(1, 3)),
                      ["d/node"]),
    "open rw own": (lambda b: _fd_op(f"{b}/d/f", os.O_RDWR, lambda fd: None), ["d/f"]),
    "open w read-only file": (lambda b: _fd_op(f"{b}/d/ro", os.O_WRONLY, lambda fd: None),
                              ["d/ro"]),
    "open r other's": (lambda b: _fd_op(f"{b}/d/other", os.O_RDONLY, lambda fd: None),
                       ["d/other"]),
    "open creat excl": (lambda b: os.close(os.open(f"{b}/d/new", os.O_CREAT | os.O_EXCL
                                                   | os.O_WRONLY, 0o640)), ["d/new"]),
    "open creat in rootdir": (lambda b: os.close(os.open(f"{b}/rootdir/new", os.O_CREAT
                                                         | os.O_WRONLY, 0o644)),
                              ["rootdir/new"]),
    "rename in d": (lambda b: os.rename(f"{b}/d/f", f"{b}/d/g"), ["d/f", "d/g"]),
    "rename in sticky dir": (lambda b: os.rename(f"{b}/st/f", f"{b}/st/g"), ["st/f", "st/g"]),
    "rmdir": (lambda b: os.rmdir(f"{b}/d/sd"), ["d/sd"]),
    "symlink": (lambda b: os.symlink("f", f"{b}/d/sym"), ["d/sym"]),
    "truncate own": (lambda b: os.truncate(f"{b}/d/f", 3), ["d/f"]),
    "truncate read-only": (lambda b: os.truncate(f"{b}/d/ro", 3), ["d/ro"]),
    "unlink": (lambda b: os.unlink(f"{b}/d/f"), ["d/f"]),
    "unlink in sticky dir": (lambda b: os.unlink(f"{b}/st/f"), ["st/f"]),
    "utimensat now": (lambda b: os.utime(f"{b}/d/f"), ["d/f"]),
    "utimensat set": (lambda b: os.utime(f"{b}/d/f", (1_000_000, 1_000_000)), ["d/f"]),
    "utimensat now other's": (lambda b: os.utime(f"{b}/d/other"), ["d/other"]),
    "ftruncate": (lambda b: _fd_op(f"{b}/d/f", os.O_RDWR, lambda fd: os.ftruncate(fd, 5)),
                  ["d/f"]),
    "posix_fallocate": (lambda b: _fd_op(f"{b}/d/f", os.O_RDWR,
                                         lambda fd: os.posix_fallocate(fd, 0, 8192)), ["d/f"]),
}
# Killing set-id bits: on write, truncate, open with O_TRUNC and chown (kernel
# setattr_should_drop_suidgid: setuid always goes, setgid with group execute always, setgid
# without it only for a caller outside the group and without CAP_FSETID).
for _name, _rel in (("suid+sgid", "d/sx"), ("sgid no-gexec", "d/sg")):
    OPS.update({
        f"write {_name}": ((lambda r: lambda b: _fd_op(f"{b}/{r}", os.O_WRONLY | os.O_APPEND,
                                                      lambda fd: os.write(fd, b"x")))(_rel),
                           [_rel]),
        f"truncate {_name}": ((lambda r: lambda b: os.truncate(f"{b}/{r}", 1))(_rel), [_rel]),
        f"open O_TRUNC {_name}": ((lambda r: lambda b: os.close(
            os.open(f"{b}/{r}", os.O_WRONLY | os.O_TRUNC)))(_rel), [_rel]),
        f"chown -1 -1 {_name}": ((lambda r: lambda b: os.chown(f"{b}/{r}", -1, -1))(_rel),
                                 [_rel]),
    })


def as_caller(uid, fn):
    """Runs fn() in a child with uid:uid and no supplementary groups; returns "ok" or the
    errno name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        res = "ok"
        try:
            if uid:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            fn()
        except OSError as e:
            res = __import__("errno").errorcode.get(e.errno, str(e.errno))
        except Exception as e:  # noqa: BLE001 - recorded as the result
            res = type(e).__name__
        os.write(w, res.encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 256).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


def state(base, rel):
    p = os.path.join(base, rel)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "absent"
    size = st.st_size if not os.path.isdir(p) else 0
    return [oct(st.st_mode), st.st_uid, st.st_gid, size,
            st.st_nlink if not os.path.isdir(p) else 0,
            int(st.st_mtime)]


LAYERS = ["lower", "upper", "copied-up"]
USERNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "userns.py")


def copy_up(base):
    """Copies every object of the tree up without changing what `state` records: files are
    opened for write and closed, directories get a user.* xattr."""
    for top, dirs, files in os.walk(base):
        os.setxattr(top, "user.posix-suite", b"1")
        for name in files:
            os.close(os.open(os.path.join(top, name), os.O_WRONLY))


def mount(target, binary, opts, merged, rootless):
    if target == "kernel":
        extra = ",userxattr" if rootless else ""
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts + extra, merged],
                       check=True)
    elif target == "fuse-overlayfs":
        subprocess.run(["fuse-overlayfs", "-o", opts, merged], check=True, capture_output=True)
    else:
        subprocess.run([binary, "-o", opts, merged], check=True)


def mount_options(path):
    """The superblock options of the mount at `path` ("" when nothing is mounted there)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return fields[-1]
    return ""


def run_case(target, binary, scratch, op, caller, layer="lower", rootless=False, seen=None):
    """One operation as one caller on a fresh tree in `layer`; returns [result, states].
    `seen`, when given, collects the mount's options per target."""
    fn, paths = OPS[op]
    d = tempfile.mkdtemp(dir=scratch)
    lower, upper, work, merged = (os.path.join(d, x) for x in ("l", "u", "w", "m"))
    for x in (lower, upper, work, merged):
        os.makedirs(x)
    os.chmod(d, 0o755)
    if layer != "upper":
        build(lower)
    base = merged
    try:
        if target == "plain":
            base = lower
        else:
            mount(target, binary, f"lowerdir={lower},upperdir={upper},workdir={work}",
                  merged, rootless)
            if seen is not None:
                seen[target] = mount_options(merged)
        if layer == "upper":
            build(base)
        elif layer == "copied-up":
            copy_up(base)
        res = as_caller(CALLERS[caller], lambda: fn(base))
        post = {p: state(base, p) for p in paths}
        if op != "utimensat set":
            for v in post.values():
                if isinstance(v, list):
                    v[5] = 0  # times move with the clock; only the explicit set is compared
        return [res, post]
    finally:
        if target != "plain":
            subprocess.run(["umount", merged], capture_output=True)
            subprocess.run(["umount", "-l", merged], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def run_matrix(binary, targets, layers, rootless, seen):
    """Every operation as every caller in every layer on the plain directory and each target:
    {case name: {target: [result, states]}}."""
    results = {}
    scratch = tempfile.mkdtemp(prefix="stratafs-posix-", dir="/var/tmp")
    os.chmod(scratch, 0o755)
    try:
        for layer in layers:
            tag = ", ".join(x for x in (("rootless" if rootless else ""),
                                        ("" if layer == "lower" else layer)) if x)
            for op in OPS:
                for caller in CALLERS:
                    row = {"plain": run_case("plain", binary, scratch, op, caller, layer,
                                             rootless)}
                    for t in targets:
                        row[t] = run_case(t, binary, scratch, op, caller, layer, rootless, seen)
                    results[f"{op} as {caller}" + (f" [{tag}]" if tag else "")] = row
    finally:
        common.unmount_all_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def run_rootless(binary, targets, layers, ops=""):
    """The matrix run by root of a new user namespace (fstests/userns.py): this script again
    with --inner-rootless, which writes its results to a file."""
    fd, out = tempfile.mkstemp(prefix="stratafs-posix-rootless-", dir="/var/tmp")
    os.close(fd)
    try:
        r = subprocess.run([sys.executable, USERNS, sys.executable, os.path.abspath(__file__),
                            "--binary", binary, "--targets", ",".join(targets),
                            "--layers", ",".join(layers), "--ops", ops,
                            "--inner-rootless", out],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode:
            sys.exit(f"posix: the rootless run failed ({r.returncode}): {r.stderr[-500:]}")
        with open(out) as f:
            data = json.load(f)
        return data["results"], data["seen"]
    finally:
        os.unlink(out)


def report(results, targets):
    """Prints FAIL/DEVIATES/NOTE lines and the per-target totals; returns stratafs's failures
    (cases the kernel passes and stratafs does not)."""
    totals = {t: [0, 0] for t in targets}
    failed_ours = 0
    for case, row in results.items():
        marks = []
        for t in targets:
            ok = row[t] == row["plain"]
            totals[t][0 if ok else 1] += 1
            if not ok:
                marks.append(t)
        kernel_ok = "kernel" not in targets or row["kernel"] == row["plain"]
        ours_ok = row.get("stratafs") == row["plain"]
        if "stratafs" in targets and not ours_ok:
            if kernel_ok:
                failed_ours += 1
                print(f"FAIL {case}: stratafs {row['stratafs']} vs plain {row['plain']}")
            else:
                print(f"DEVIATES {case}: kernel and stratafs differ from the plain directory "
                      f"(kernel {row['kernel']}, stratafs {row['stratafs']}, plain {row['plain']})")
        elif marks:
            print(f"NOTE {case}: {', '.join(marks)} differ from the plain directory")
    for t in targets:
        print(f"{t}: {totals[t][0]} of {len(results)} cases as the plain directory")
    return failed_ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--targets", default="stratafs,kernel,fuse-overlayfs")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--no-rootless", action="store_true", help="skip the user-namespace run")
    ap.add_argument("--ops", default="", help="only operations whose name contains this")
    ap.add_argument("--json", help="also write every result here")
    ap.add_argument("--inner-rootless", help=argparse.SUPPRESS)
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",")
               if t != "fuse-overlayfs" or shutil.which("fuse-overlayfs")]
    layers = [x for x in args.layers.split(",") if x]
    for name in [n for n in OPS if args.ops not in n]:
        del OPS[name]
    binary = os.path.abspath(args.binary)
    seen = {}
    if args.inner_rootless:
        results = run_matrix(binary, targets, layers, True, seen)
        with open(args.inner_rootless, "w") as f:
            json.dump({"results": results, "seen": seen}, f)
        return 0
    common.enter_private_mount_namespace()
    results = run_matrix(binary, targets, layers, False, {})
    if not args.no_rootless:
        more, seen = run_rootless(binary, targets, layers, args.ops)
        results.update(more)
        for t, opts in sorted(seen.items()):
            if t != "kernel":
                print(f"NOTE rootless mount options of {t}: {opts}")
    failed_ours = report(results, targets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    passed = len(results) - failed_ours
    print(f"posix: {passed} passed, {failed_ours} failed")
    return 0 if failed_ours == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
