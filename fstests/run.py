#!/usr/bin/env python3
"""Runs every fstests suite through real mounts and prints one summary line.

Why one entry point: tools/test and CI run the whole semantics suite with one command, and a
failing suite must neither hide the others nor stop them.

Suites (each a separate program, each ending with "N passed, M failed"):
  read       read_suite.py: merged views, differential against kernel overlayfs
  write      write_suite.py: every operation on every placement, differential, plus
             interoperability of the upper layers both ways
  write-rootless  the same in a user namespace (kernel with userxattr; user.overlay.* xattrs)
  interop    interop_fuse_overlayfs.py: uppers written by fuse-overlayfs read by stratafs
  fsx        fsx.py: random-operation data-integrity exerciser against an in-memory model
  fsx-nopassthrough  the same with passthrough=off: reads (spliced) and writes through the daemon
  crash      crashloop.py: SIGKILL of the daemon mid-way through a workload of every write
             operation (and of remounts mid-cleanup), then checks
  io_uring   io_uring_check.py: `-o io_uring` serves requests through the rings (and falls
             back to /dev/fuse when the kernel does not offer them)
  write-uring     the write suite with every stratafs mount on `-o io_uring`
  fsx-uring  fsx with passthrough=off and io_uring: reads and writes through the rings

The io_uring suites switch the kernel's fuse.enable_uring parameter on for their run and put
it back afterwards.

Usage: python3 fstests/run.py [--binary PATH] [--only read,write,...]
Ends with the line "fstests: N passed, M failed".
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SUITES = {
    "read": "read_suite.py",
    "write": "write_suite.py",
    "write-rootless": "write_suite.py --rootless",
    "interop": "interop_fuse_overlayfs.py",
    "fsx": "fsx.py",
    "fsx-nopassthrough": "fsx.py --options passthrough=off --seed 2",
    "crash": "crashloop.py",
    "io_uring": "io_uring_check.py",
    "write-uring": "write_suite.py",
    "fsx-uring": "fsx.py --options passthrough=off,io_uring --seed 3",
}

# Suites run with FUSE over io_uring allowed by the kernel, and the options every stratafs
# mount in them gets.
URING_SUITES = {"io_uring": "", "write-uring": "io_uring", "fsx-uring": ""}
ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"


def set_enable_uring(value):
    """Sets fuse.enable_uring; returns the previous value, or None if there is none."""
    try:
        with open(ENABLE_URING) as f:
            old = f.read().strip()
        with open(ENABLE_URING, "w") as f:
            f.write(value)
        return old
    except OSError as e:
        print(f"cannot set {ENABLE_URING}: {e}")
        return None


def run_suite(name, script, binary):
    """Runs one suite, echoing its output; returns (passed, failed)."""
    if name not in URING_SUITES:
        return run_script(name, script, binary, os.environ)
    old = set_enable_uring("Y")
    env = {**os.environ, "STRATAFS_EXTRA_OPTS": URING_SUITES[name]}
    try:
        return run_script(name, script, binary, env)
    finally:
        if old is not None:
            set_enable_uring(old)


def run_script(name, script, binary, env):
    """Runs one suite program with `env`, echoing its output; returns (passed, failed)."""
    script, *extra = script.split()
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        print(f"== {name}: {script} missing")
        return 0, 1
    print(f"== {name}: python3 fstests/{script} --binary {binary} {' '.join(extra)}", flush=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, path, "--binary", binary] + extra, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    last = None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = re.search(r"(\d+) passed, (\d+) failed", line)
        if m:
            last = (int(m.group(1)), int(m.group(2)))
    rc = proc.wait()
    print(f"== {name}: exit {rc} after {time.time() - started:.0f} s", flush=True)
    if last is None:
        return 0, 1
    passed, failed = last
    if rc != 0 and failed == 0:
        failed = 1  # a suite that failed without saying so still failed
    return passed, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--only", default=",".join(SUITES), help="comma-separated suite names")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    wanted = [s for s in args.only.split(",") if s]
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        sys.exit(f"unknown suite(s): {', '.join(unknown)} (known: {', '.join(SUITES)})")
    total_passed = total_failed = 0
    for name in wanted:
        passed, failed = run_suite(name, SUITES[name], binary)
        total_passed += passed
        total_failed += failed
    print(f"fstests: {total_passed} passed, {total_failed} failed")
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
