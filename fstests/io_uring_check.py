#!/usr/bin/env python3
"""FUSE over io_uring (`-o io_uring[=WORKERS]`): requests are served through the rings, data
survives the trip both ways, rootless too, and a kernel without the rings gets `/dev/fuse`.

Why: the write-uring and fsx-uring suites run whole workloads with `-o io_uring`, but would
pass just the same if the daemon silently fell back to reading /dev/fuse. Here each scenario
checks, from the daemon's threads (`uring-Q.W`, one per CPU queue and worker), which path
served the requests, and what the mount showed.

Needs root and /dev/fuse; sets fuse.enable_uring itself for each scenario and puts the old
value back. Ends with "N passed, M failed".
"""

import argparse
import collections
import hashlib
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"


def set_enable_uring(value):
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    with open(ENABLE_URING, "w") as f:
        f.write(value)
    return old


class Daemon:
    """stratafs in the foreground on tmp/m over tmp/l, with tmp/u and tmp/w."""

    def __init__(self, binary, tmp, opts, prefix=()):
        self.tmp, self.mnt = tmp, f"{tmp}/m"
        for d in ("l", "u", "w", "m"):
            os.makedirs(f"{tmp}/{d}", exist_ok=True)
        base = f"lowerdir={tmp}/l,upperdir={tmp}/u,workdir={tmp}/w"
        self.log = open(f"{tmp}/daemon.log", "wb")
        self.proc = subprocess.Popen(list(prefix) + [binary, "-f", "-o", f"{base},{opts}",
                                                     self.mnt],
                                     stdout=self.log, stderr=self.log)

    def wait_mounted(self):
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def thread_runs(self):
        """{thread name: times it was scheduled} for the daemon's threads."""
        runs = {}
        task = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(task):
            try:
                name = open(f"{task}/{tid}/comm").read().strip()
                runs[name] = int(open(f"{task}/{tid}/schedstat").read().split()[2])
            except OSError:
                pass
        return runs

    def stop(self):
        subprocess.run(["umount", self.mnt], stderr=subprocess.DEVNULL)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "still running 20 s after umount"
        self.log.close()
        return rc

    def log_text(self):
        return open(f"{self.tmp}/daemon.log", errors="replace").read()[-2000:]


def fill_lower(tmp):
    os.makedirs(f"{tmp}/l/d", exist_ok=True)
    with open(f"{tmp}/l/d/f", "w") as f:
        f.write("lower\n")
    os.setxattr(f"{tmp}/l/d/f", "user.k", b"v")


def workload(mnt):
    """A bit of every kind of request; returns what it saw, for comparison."""
    seen = [sorted(os.listdir(f"{mnt}/d")), open(f"{mnt}/d/f").read(),
            os.getxattr(f"{mnt}/d/f", "user.k")]
    with open(f"{mnt}/d/f", "a") as f:  # copy-up
        f.write("more\n")
    os.mkdir(f"{mnt}/new")
    for i in range(50):
        with open(f"{mnt}/new/{i}", "w") as f:
            f.write(str(i))
        os.stat(f"{mnt}/new/{i}")
    os.rename(f"{mnt}/new/0", f"{mnt}/new/zero")
    os.unlink(f"{mnt}/new/1")
    seen += [open(f"{mnt}/d/f").read(), sorted(os.listdir(f"{mnt}/new"))[:3],
             len(os.listdir(f"{mnt}/new"))]
    return seen


EXPECTED = [["f"], "lower\n", b"v", "lower\nmore\n", ["10", "11", "12"], 49]


def uring_runs(runs):
    return sum(n for name, n in runs.items() if name.startswith("uring-"))


def with_daemon(binary, tmp, opts, check):
    """Mounts with `opts`, runs `check(daemon)` -> problems, unmounts; adds a failed mount or
    a bad exit status of the daemon to the problems."""
    d = Daemon(binary, tmp, opts)
    try:
        if not d.wait_mounted():
            return [f"did not mount: {d.log_text()}"]
        problems = check(d)
    finally:
        rc = d.stop()
    if rc != 0:
        problems.append(f"daemon exit status {rc} after umount: {d.log_text()}")
    return problems


def sc_rings_serve(binary, tmp):
    """`-o io_uring`: two workers per CPU queue, and they served the workload."""
    fill_lower(tmp)
    set_enable_uring("Y")

    def check(d):
        problems = []
        before = uring_runs(d.thread_runs())
        seen = workload(d.mnt)
        runs = d.thread_runs()
        if seen != EXPECTED:
            problems.append(f"workload saw {seen}, expected {EXPECTED}")
        workers = sorted(n for n in runs if n.startswith("uring-"))
        if not workers:
            problems.append(f"no io_uring workers (threads: {sorted(runs)})")
        elif uring_runs(runs) - before < 50:
            problems.append(f"io_uring workers ran {uring_runs(runs) - before} times for "
                            f"~170 requests: not serving them ({runs})")
        if workers and not any(w.endswith(".1") for w in workers):
            problems.append(f"expected 2 workers per queue, got {workers}")
        return problems
    return with_daemon(binary, tmp, "io_uring", check)


def sc_big_data(binary, tmp):
    """Reads and writes of 1 MiB through the rings (passthrough off): payload-sized requests
    and replies, byte for byte."""
    fill_lower(tmp)
    data = os.urandom(3 * 1024 * 1024 + 123)
    with open(f"{tmp}/l/big", "wb") as f:
        f.write(data)
    set_enable_uring("Y")

    def check(d):
        problems = []
        got = subprocess.run(["dd", f"if={d.mnt}/big", "bs=1M", "status=none"],
                             capture_output=True).stdout
        if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
            problems.append(f"read of the lower file: {len(got)} bytes, content differs")
        subprocess.run(["dd", f"of={d.mnt}/copy", "bs=1M", "status=none", "conv=fsync"],
                       input=data, check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        got = open(f"{d.mnt}/copy", "rb").read()
        if got != data:
            problems.append(f"written file reads back {len(got)} bytes, content differs")
        if open(f"{tmp}/u/copy", "rb").read() != data:
            problems.append("upper file differs from what was written")
        if uring_runs(d.thread_runs()) < 10:
            problems.append("io_uring workers did not serve the reads and writes")
        return problems
    return with_daemon(binary, tmp, "io_uring,passthrough=off", check)


def sc_rootless(binary, tmp):
    """In a user namespace (no passthrough there): the rings serve as well."""
    fill_lower(tmp)
    os.chmod(tmp, 0o777)
    for sub in ("l", "l/d", "u", "w", "m"):
        os.makedirs(f"{tmp}/{sub}", exist_ok=True)
        os.chmod(f"{tmp}/{sub}", 0o777)
    os.chmod(f"{tmp}/l/d/f", 0o666)
    set_enable_uring("Y")
    script = f"""
set -e
{binary} -o lowerdir={tmp}/l,upperdir={tmp}/u,workdir={tmp}/w,io_uring {tmp}/m
cat {tmp}/m/d/f
echo more >> {tmp}/m/d/f
for i in $(seq 40); do echo $i > {tmp}/m/n$i; done
cat {tmp}/m/d/f {tmp}/m/n40
pid=$(pgrep -n -x stratafs)
total=0
for t in /proc/$pid/task/*; do
  case $(cat $t/comm) in uring-*) total=$((total + $(cut -d' ' -f3 $t/schedstat)));; esac
done
echo "uring-runs $total"
umount {tmp}/m
"""
    p = subprocess.run(["unshare", "-Urm", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    problems = []
    if p.returncode != 0:
        return [f"rootless run failed ({p.returncode}): {p.stderr[-1500:]}"]
    lines = p.stdout.split("\n")
    if lines[:4] != ["lower", "lower", "more", "40"]:
        problems.append(f"rootless mount showed {lines[:4]}")
    runs = [int(x.split()[1]) for x in lines if x.startswith("uring-runs")]
    if not runs or runs[0] < 40:
        problems.append(f"io_uring workers ran {runs} times for ~90 requests")
    return problems


def sc_fallback(binary, tmp):
    """fuse.enable_uring off: `-o io_uring` still mounts, and /dev/fuse readers serve."""
    fill_lower(tmp)
    set_enable_uring("N")
    logs = []

    def check(d):
        problems = []
        seen = workload(d.mnt)
        if seen != EXPECTED:
            problems.append(f"workload saw {seen}, expected {EXPECTED}")
        workers = [n for n in d.thread_runs() if n.startswith("uring-")]
        if workers:
            problems.append(f"io_uring workers started though the kernel refused: {workers}")
        logs.append(d)
        return problems
    problems = with_daemon(binary, tmp, "io_uring", check)
    if logs and "does not offer FUSE over io_uring" not in logs[0].log_text():
        problems.append(f"no log line about the fallback: {logs[0].log_text()}")
    return problems


def sc_bad_option(binary, tmp):
    """A worker count out of range is refused before mounting, with the option named."""
    fill_lower(tmp)
    for d in ("u", "w", "m"):
        os.makedirs(f"{tmp}/{d}", exist_ok=True)
    problems = []
    for bad in ("io_uring=17", "io_uring=-1", "io_uring=x"):
        p = subprocess.run([binary, "-o", f"lowerdir={tmp}/l,upperdir={tmp}/u,"
                            f"workdir={tmp}/w,{bad}", f"{tmp}/m"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode == 0:
            subprocess.run(["umount", f"{tmp}/m"])
            problems.append(f"{bad}: accepted")
        elif "io_uring" not in p.stderr:
            problems.append(f"{bad}: error does not name the option: {p.stderr.strip()}")
    return problems


Scenario = collections.namedtuple("Scenario", "name run")

SCENARIOS = [
    Scenario("rings-serve", sc_rings_serve),
    Scenario("big-data", sc_big_data),
    Scenario("rootless", sc_rootless),
    Scenario("fallback", sc_fallback),
    Scenario("bad-option", sc_bad_option),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=common.DEFAULT_BINARY)
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary)
    todo = [sc for sc in SCENARIOS if args.filter in sc.name]
    if not common.can_run(binary) or not os.path.exists(ENABLE_URING):
        print(f"io_uring check needs root, /dev/fuse, the binary and {ENABLE_URING}")
        print(f"0 passed, {len(todo)} failed")
        return 1
    old = set_enable_uring(open(ENABLE_URING).read().strip())
    try:
        failed = common.run_suite("io_uring", todo, lambda tmp, sc: sc.run(binary, tmp))
    finally:
        set_enable_uring(old)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
