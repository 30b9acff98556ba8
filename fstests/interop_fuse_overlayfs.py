#!/usr/bin/env python3
"""Interoperability with fuse-overlayfs: an upper layer written by fuse-overlayfs must show,
when mounted by stratafs, what fuse-overlayfs itself showed.

Why: users switch an existing containers-storage store from fuse-overlayfs to stratafs; the
containers' upper layers were written by fuse-overlayfs (its whiteouts, opaque markers and
xattrs). For every write-suite scenario this

  1. builds the write suite's fixture and mounts fuse-overlayfs (the Debian package),
  2. runs the scenario's operations and unmounts,
  3. mounts fuse-overlayfs again on the same layers and upper and records its merged tree
     (what it wrote, not what it kept in memory: fuse-overlayfs shows lower hard links it
     copied up as one file until unmounted, then as two),
  4. mounts stratafs on them and compares its merged tree with the recorded one.

Scenarios whose operation fuse-overlayfs refuses or gets wrong are still compared: what
matters is that stratafs reads what fuse-overlayfs wrote the way fuse-overlayfs meant it.

Usage: python3 fstests/interop_fuse_overlayfs.py [--binary PATH] [--filter SUBSTR]
Ends with the line "N passed, M failed".
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import write_suite  # noqa: E402

FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"


@dataclasses.dataclass
class Scenario:
    name: str
    script: str


def comparable(snap):
    """Link counts are left out: they are not part of what an upper layer encodes, and
    fuse-overlayfs computes its own (subdirectories of merged directories; the names of a
    lower hard link it can see) where kernel overlayfs and stratafs report 1 for merged
    directories and the real count of lower files. The write suite checks stratafs's link
    counts against the kernel's."""
    return {k: " ".join(w for w in v.split() if not w.startswith("nlink="))
            for k, v in common.scrub_mtimes(snap).items()}


def run_one(binary, tmp, sc):
    top = f"{tmp}/f"
    write_suite.base_fixture(top)
    mnt = f"{top}/m"
    os.makedirs(mnt)
    opts = common.overlay_opts(write_suite.lowers(top), f"{top}/u", f"{top}/w")
    subprocess.run([FUSE_OVERLAYFS, "-o", opts, mnt], check=True, capture_output=True,
                   timeout=30)
    try:
        common.run_ops(mnt, sc.script)
    finally:
        common.unmount(mnt)
    subprocess.run([FUSE_OVERLAYFS, "-o", opts, mnt], check=True, capture_output=True,
                   timeout=30)
    try:
        seen_by_fo = comparable(common.snapshot(mnt))
    finally:
        common.unmount(mnt)
    shutil.rmtree(f"{top}/w")
    os.makedirs(f"{top}/w")
    common.mount_strata(binary, write_suite.lowers(top), f"{top}/u", f"{top}/w", mnt)
    try:
        seen_by_strata = comparable(common.snapshot(mnt))
    finally:
        common.unmount(mnt)
    lines = []
    for k in sorted(set(seen_by_fo) | set(seen_by_strata)):
        if seen_by_fo.get(k) != seen_by_strata.get(k):
            lines.append(f"  {k}: fuse-overlayfs={seen_by_fo.get(k)} "
                         f"stratafs={seen_by_strata.get(k)}")
    return lines[:12]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    todo = [Scenario(n, s) for (n, s) in write_suite.scenarios() if args.filter in n]
    if not common.can_run(args.binary) or not os.path.exists(FUSE_OVERLAYFS):
        print("interop suite needs root, /dev/fuse, fuse-overlayfs and the stratafs binary")
        print(f"0 passed, {len(todo)} failed")
        return 1
    failed = common.run_suite("fuse-overlayfs interop", todo,
                              lambda tmp, sc: run_one(args.binary, tmp, sc))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
