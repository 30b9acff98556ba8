#!/usr/bin/env python3
"""fsx for stratafs: a long stream of random file operations, every result checked byte for byte
against an in-memory model of what each file must contain.

Why this test exists
--------------------
The differential suites (read_suite.py, write_suite.py) compare the *shape* of a tree after a
few operations each. Data corruption in a union filesystem hides elsewhere: in copy-up racing
with open descriptors, the page cache and mmap; in size bookkeeping across truncate, fallocate,
O_APPEND and copy_file_range; in writes past EOF that must leave holes reading as zeros; in what
reaches the upper layer and survives an unmount. Like the classic fsx, this script runs a
deterministic (--seed) stream of weighted random operations on a few files and keeps each
file's expected content in a bytearray. Every read and every st_size is compared with that
model, the whole files every --verify-every operations, and every --remount-every operations
(and at the end) the union is unmounted and mounted again and the files compared once more:
the data must have persisted through the upper layer.

The files start in the LOWER layers (a 512 KiB file and a sparse 1 MiB file with holes in the
bottom layer, a small file in the top one), so the first write, truncate, link or chmod of each
triggers a data or metadata copy-up. As that happens only once per file, a fourth slot takes a
newcomer every --fresh-every operations: another file that is still only in a lower layer
(dense, sparse, tiny or empty), so that every operation also meets files in every copy-up
state. `other/`, a directory of both lower layers, is a rename target. Operations: pwrite
(also past EOF), pread (through the open descriptor, or a fresh one, sometimes after dropping
the cached pages so that the read reaches the daemon), truncate (shrink and grow, by
descriptor or by path), fallocate (mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE; a mode
answered with EOPNOTSUPP is reported once and skipped from then on), mmap MAP_SHARED read, and
write + msync, O_APPEND writes, copy_file_range between two of the files, fsync/fdatasync,
close and reopen (sometimes with O_TRUNC), rename within the directory / into `other/` and
back (then a read through the new name), link of a second name + unlink of one of the two
(then a whole-file read through the one left), chmod. --without OP leaves an operation out
(its random draws stay, so the rest of the sequence is unchanged) to look past a known bug.

With fio installed (`apt-get install -y fio`), fio jobs with --verify=crc32c follow:
sequential and random writes to new files, a random write job with the mmap engine, partial
sequential and random overwrites of lower files (the bytes fio does not touch must still be the
lower's), then an unmount, a mount and every job again with --verify_only.

--target kernel runs exactly the same operation sequence on kernel overlayfs
(redirect_dir=on,metacopy=on): a failure there is a bug in this script's model, not in
stratafs; a failure on stratafs only is a stratafs bug.

Usage (as root, with /dev/fuse):
    python3 fstests/fsx.py                          # 100k operations on stratafs, seed 1, fio
    python3 fstests/fsx.py --target kernel          # the same on kernel overlayfs
    python3 fstests/fsx.py --binary /tmp/x/stratafs --ops 20000 --seed 7 --no-fio
    python3 fstests/fsx.py --ops 300 --trace --no-fio   # print every operation
    python3 fstests/fsx.py --without link_unlink    # look past a known link/unlink bug

On the first mismatch it prints the operation number, the last 20 operations, the first
differing offset and the expected and actual bytes, and stops that run. It ends with the line
"N passed, M failed" (the fsx run is one test, each fio job and each re-verification after the
remount one more) and exits 1 on any failure. Mounts and the scratch directory are always
removed, on Ctrl-C too. The mounts are made in a private mount namespace (see
enter_private_mount_namespace): other shells do not see them; use --dir and
`nsenter -t PID -m` to look inside while it runs.
"""

import argparse
import ctypes
import errno
import hashlib
import mmap
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BINARY = os.path.join(REPO, "target/release/stratafs")
KERNEL_OPTS = "redirect_dir=on,metacopy=on"

KiB = 1024
MiB = 1024 * KiB
MAX_FILE_SIZE = 1536 * KiB   # writes, truncates and fallocates stay below this
MAX_IO = 64 * KiB            # longest single read/write/copy
PAGE = mmap.PAGESIZE
HISTORY = 20                 # operations shown in a failure report
HANG_LIMIT = 120             # seconds without progress before the watchdog kills the daemon

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOCATE_MODES = {
    "0": 0,
    "KEEP_SIZE": FALLOC_FL_KEEP_SIZE,
    "PUNCH_HOLE|KEEP_SIZE": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "ZERO_RANGE": FALLOC_FL_ZERO_RANGE,
}

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Failure(Exception):
   """The filesystem disagrees with the model, or a mount or unmount went wrong."""


# ---------------------------------------------------------------- mounts

def is_mounted(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == real for line in f)


def mounts_under(top):
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    return sorted((p for p in points if p.startswith(top + "/")), key=len, reverse=True)


def run_quietly(cmd):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


class Union:
    """The layers of one test under `root` (l1 on top of l2, upper, work) and their union
    mounted at root/mnt, by stratafs (a foreground daemon) or by kernel overlayfs."""

    def __init__(self, target, binary, root, extra_options=""):
        self.target, self.binary, self.root = target, binary, root
        self.extra_options = extra_options
        self.l1, self.l2, self.upper, self.work, self.mnt = (
            os.path.join(root, d) for d in ("l1", "l2", "upper", "work", "mnt"))
        for d in (self.l1, self.l2, self.upper, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        self.log_path = os.path.join(root, "stratafs.log")
        self.daemon = None

    def path(self, rel):
        return os.path.join(self.mnt, rel)

    def options(self):
        base = f"lowerdir={self.l1}:{self.l2},upperdir={self.upper},workdir={self.work}"
        if self.extra_options and self.target != "kernel":
            return f"{base},{self.extra_options}"
        return base

    def mount(self):
        if self.target == "kernel":
            p = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"{self.options()},{KERNEL_OPTS}", self.mnt],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise Failure(f"kernel overlayfs mount failed: {p.stderr.strip()}")
        else:
            self._start_daemon()

    def _start_daemon(self):
        with open(self.log_path, "ab") as log:
            # its own session: Ctrl-C must reach this script, which then unmounts cleanly
            self.daemon = subprocess.Popen([self.binary, "-f", "-o", self.options(), self.mnt],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True)
        deadline = time.monotonic() + 30
        while not is_mounted(self.mnt):
            if self.daemon.poll() is not None:
                rc, self.daemon = self.daemon.returncode, None
                raise Failure(f"stratafs exited with status {rc} before mounting: "
                              f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill_daemon()
                raise Failure("stratafs did not mount within 30 s")
            time.sleep(0.01)

    def unmount(self):
        """Unmounts; returns what went wrong (stratafs must exit with status 0), or None."""
        for cmd in (["umount", self.mnt], ["fusermount3", "-u", self.mnt],
                    ["umount", "-l", self.mnt]):
            if not is_mounted(self.mnt):
                break
            run_quietly(cmd)
        problem = "still mounted after umount -l" if is_mounted(self.mnt) else None
        if self.daemon is not None:
            try:
                rc = self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                threads = daemon_threads(self.daemon.pid)
                self.kill_daemon()
                rc = f"killed: still running 30 s after umount; its threads: {threads}"
            if rc != 0:
                problem = f"stratafs exited with status {rc}: {self.log_tail()}"
            self.daemon = None
        return problem

    def remount(self):
        problem = self.unmount()
        if problem:
            raise Failure(f"unmount: {problem}")
        self.mount()

    def kill_daemon(self):
        """Kills a stratafs daemon: the kernel then aborts the FUSE connection, which unblocks
        whatever waits on it (the watchdog's last resort against a hang)."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()

    def log_tail(self, lines=5):
        try:
            with open(self.log_path, errors="replace") as f:
                text = re.sub(r"\x1b\[[0-9;]*m", "", f.read()).strip()  # no colours
                return " | ".join(text.splitlines()[-lines:]) or "(no output)"
        except OSError:
            return "(no log)"


def daemon_threads(pid):
    """Name, state and kernel wait channel of each thread of a process, as one line."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip()
            out.append(f"{fields[0].split('(', 1)[1]}:{fields[1].split()[0]}:{wchan}")
        except OSError:
            pass
    return " ".join(out)


class Watchdog(threading.Thread):
    """Kills the stratafs daemon when the test makes no progress for HANG_LIMIT seconds, so a
    hung filesystem turns into a failure (ENOTCONN) instead of a test that never ends."""

    def __init__(self, union):
        super().__init__(daemon=True)
        self.union = union
        self.last_progress = time.monotonic()
        self.fired = False
        self.stopped = threading.Event()

    def kick(self):
        self.last_progress = time.monotonic()

    def run(self):
        while not self.stopped.wait(5):
            if time.monotonic() - self.last_progress > HANG_LIMIT:
                self.fired = True
                print(f"watchdog: no progress for {HANG_LIMIT} s, killing the stratafs daemon",
                      flush=True)
                self.union.kill_daemon()
                self.kick()


# ---------------------------------------------------------------- the files and their layers

class TestFile:
    """One exercised file: its path in the mount, what it must contain (the model), its mode,
    and the read-write descriptor kept open on it (None until an operation needs one)."""

    def __init__(self, name, content, mode):
        self.name = name
        self.rel = f"data/{name}"
        self.model = bytearray(content)
        self.mode = mode
        self.fd = None

    def places(self):
        """Where renames may move it: its home, another name beside it, a lower directory."""
        return [f"data/{self.name}", f"data/{self.name}.moved", f"other/{self.name}"]


def write_layer_file(path, content, mode):
    """Writes a lower-layer file; runs of zeros of a page or more become holes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for offset in range(0, len(content), PAGE):
            page = content[offset:offset + PAGE]
            if any(page):
                f.seek(offset)
                f.write(page)
        f.truncate(len(content))
    os.chmod(path, mode)


def sparse_content(rng, size, islands):
    """`size` bytes of zeros with `islands` {offset: length} of random data."""
    content = bytearray(size)
    for offset, length in islands.items():
        content[offset:offset + length] = rng.randbytes(length)
    return content


def fresh_file_content(rng):
    """A newcomer: dense, sparse, tiny or empty."""
    kind = rng.random()
    if kind < 0.5:
        return rng.randbytes(rng.randint(1, 256 * KiB))
    if kind < 0.75:
        size = rng.randint(64 * KiB, 1 * MiB)
        islands = {rng.randrange(size - 4 * KiB): rng.randint(1, 4 * KiB)
                   for _ in range(rng.randint(1, 4))}
        return sparse_content(rng, size, islands)
    if kind < 0.95:
        return rng.randbytes(rng.randint(1, 4 * KiB))
    return b""


def make_fsx_layers(union, seed, fresh_count):
    """Two lower layers: the three long-lived test files and `fresh_count` newcomers (in
    either layer) that are untouched until their turn comes. Returns (long-lived TestFiles,
    newcomer TestFiles)."""
    rng = random.Random(f"fsx-layers-{seed}")
    big = rng.randbytes(512 * KiB)
    small = rng.randbytes(10_000)
    sparse = sparse_content(rng, 1 * MiB, {0: 4 * KiB, 300 * KiB: 64 * KiB,
                                           700 * KiB + 100: 5_000, 1 * MiB - 4 * KiB: 4 * KiB})
    write_layer_file(f"{union.l2}/data/big.bin", big, 0o644)
    write_layer_file(f"{union.l2}/data/sparse.bin", sparse, 0o644)
    write_layer_file(f"{union.l1}/data/small.bin", small, 0o640)
    write_layer_file(f"{union.l2}/other/bottom.txt", b"bottom layer\n", 0o644)
    write_layer_file(f"{union.l1}/other/top.txt", b"top layer\n", 0o644)
    long_lived = [TestFile("big.bin", big, 0o644), TestFile("small.bin", small, 0o640),
                  TestFile("sparse.bin", sparse, 0o644)]
    newcomers = []
    for i in range(fresh_count):
        content, mode = fresh_file_content(rng), rng.choice([0o644, 0o600, 0o755])
        layer = union.l1 if i % 2 else union.l2
        write_layer_file(f"{layer}/data/fresh-{i:04}.bin", content, mode)
        newcomers.append(TestFile(f"fresh-{i:04}.bin", content, mode))
    return long_lived, newcomers


# ---------------------------------------------------------------- comparing

def first_difference(a, b):
    """Index of the first differing byte (or the shorter length when one is a prefix)."""
    n = min(len(a), len(b))
    for start in range(0, n, 4096):
        if a[start:start + 4096] != b[start:start + 4096]:
            return next(i for i in range(start, min(start + 4096, n)) if a[i] != b[i])
    return n


def hexdump(chunk):
    return chunk.hex(" ") if chunk else "(nothing)"


def describe_difference(what, offset, expected, got):
    i = first_difference(expected, got)
    overlap = min(len(expected), len(got))
    differing = [j for j in range(i, overlap) if expected[j] != got[j]]
    lines = [f"{what}: {len(got)} bytes at offset {offset}, expected {len(expected)}",
             f"  first difference at file offset {offset + i} (0x{offset + i:x})",
             f"  expected: {hexdump(expected[i:i + 16])}",
             f"  got:      {hexdump(got[i:i + 16])}"]
    if differing:
        bad = got[differing[0]:differing[-1] + 1]
        lines.append(f"  {len(differing)} differing bytes in file range "
                     f"[{offset + differing[0]}, {offset + differing[-1] + 1})"
                     + ("; the bad bytes read as zeros" if not any(bad) else ""))
    return "\n".join(lines)


def read_whole(path):
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(1 * MiB):
            chunks.append(chunk)
    return b"".join(chunks)


def apply_write(model, offset, data):
    """What a write of `data` at `offset` does to a file: holes before it read as zeros."""
    if not data:
        return
    if offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset:offset + len(data)] = data


def resize(model, size):
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def format_entry(entry):
    opno, op, rel, offset, length, extra = entry
    where = "" if offset is None else f" offset={offset} (0x{offset:x})"
    size = "" if length is None else f" length={length}"
    return f"#{opno:<7} {op:<14} {rel}{where}{size} {extra}".rstrip()


# ---------------------------------------------------------------- the exerciser

class Fsx:
    """The random operation stream on the files in `union`, checked against their models.

    The three long-lived files take operations for the whole run; a fourth slot holds a
    newcomer, replaced every `fresh_every` operations by the next file that is still only in a
    lower layer, so that copy-up (data and metadata-only, by any operation) keeps being
    exercised after the first few operations. A retired newcomer is remembered by size, mode
    and checksum and checked again after every remount."""

    def __init__(self, union, long_lived, newcomers, seed, fresh_every, trace=False,
                 watchdog=None, without=()):
        self.union = union
        self.newcomers = deque(newcomers)
        self.files = long_lived + [self.newcomers.popleft()]
        self.fresh_every = fresh_every
        self.retired = []  # (rel, size, mode, sha256)
        self.rng = random.Random(seed)
        self.trace = trace
        self.watchdog = watchdog
        self.opno = 0
        self.history = deque(maxlen=HISTORY)
        self.counts = Counter()
        self.unsupported = set()
        weighted_ops = [
            (self.op_pwrite, 22), (self.op_pread, 22), (self.op_truncate, 4),
            (self.op_fallocate, 6), (self.op_mmap_read, 3), (self.op_mmap_write, 4),
            (self.op_append, 4), (self.op_copy_range, 5), (self.op_fsync, 2),
            (self.op_reopen, 3), (self.op_rename, 2), (self.op_link_unlink, 2),
            (self.op_chmod, 2),
        ]
        self.ops = [op for op, _ in weighted_ops]
        # a left-out operation keeps its place (weight 0): the random stream stays comparable
        self.op_weights = [0 if op.__name__.removeprefix("op_") in without else w
                           for op, w in weighted_ops]
        self.file_weights = [5, 2, 2, 3]

    # ---- running

    def run(self, nops, verify_every, remount_every, progress_every=10_000):
        started = time.monotonic()
        for self.opno in range(1, nops + 1):
            self.step()
            if self.opno % self.fresh_every == 0 and self.newcomers:
                self.bring_in_newcomer()
            if self.opno % verify_every == 0:
                self.verify_all(f"periodic check after op {self.opno}")
            if self.opno % remount_every == 0:
                self.remount_and_verify()
            if self.opno % progress_every == 0:
                print(f"  {self.opno} ops, {time.monotonic() - started:.1f} s", flush=True)
        self.opno = nops
        self.verify_all("final check")
        self.remount_and_verify()
        self.verify_upper_layer()

    def step(self):
        op = self.rng.choices(self.ops, self.op_weights)[0]
        f = self.rng.choices(self.files, self.file_weights)[0]
        op(f)
        for g in self.files:
            self.check_stat(g)
        if self.watchdog:
            self.watchdog.kick()

    def bring_in_newcomer(self):
        old = self.files[-1]
        self.verify_file(old, "before retiring it")
        if old.fd is not None:
            os.close(old.fd)
        digest = hashlib.sha256(old.model).digest()
        self.retired.append((old.rel, len(old.model), old.mode, digest))
        self.files[-1] = self.newcomers.popleft()
        self.note("newcomer", self.files[-1], extra=f"replaces {old.rel}")

    def note(self, op, f, offset=None, length=None, extra=""):
        entry = (self.opno, op, f.rel, offset, length, extra)
        self.history.append(entry)
        self.counts[op] += 1
        if self.trace:
            print(format_entry(entry), flush=True)

    def failure_report(self, error):
        lines = [f"FAIL at op {self.opno} ({self.union.target}): {error}",
                 f"last {len(self.history)} operations:"]
        lines += ["  " + format_entry(e) for e in self.history]
        return "\n".join(lines)

    # ---- helpers

    def path(self, f):
        return self.union.path(f.rel)

    def rw_fd(self, f):
        """The file's read-write descriptor, opened on first use (a copy-up for lower files)."""
        if f.fd is None:
            f.fd = os.open(self.path(f), os.O_RDWR)
        return f.fd

    def close_all(self):
        for f in self.files:
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None

    def pick_length(self):
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 16)
        if r < 0.85:
            return self.rng.randint(1, 8 * KiB)
        return self.rng.randint(8 * KiB + 1, MAX_IO)

    def pick_write_offset(self, size, length):
        """Mostly inside the file or at EOF, sometimes just past it, sometimes anywhere."""
        r = self.rng.random()
        if r < 0.75:
            offset = self.rng.randint(0, size)
        elif r < 0.9:
            offset = size + self.rng.randint(1, 64 * KiB)
        else:
            offset = self.rng.randrange(MAX_FILE_SIZE)
        return max(0, min(offset, MAX_FILE_SIZE - length))

    def pick_read_offset(self, size):
        if self.rng.random() < 0.9:
            return self.rng.randint(0, size)
        return size + self.rng.randint(0, 64 * KiB)

    def check_bytes(self, what, offset, expected, got):
        if got != expected:
            raise Failure(describe_difference(what, offset, expected, got))

    def check_stat(self, f):
        st = os.stat(self.path(f))
        if st.st_size != len(f.model):
            raise Failure(f"stat {f.rel}: st_size {st.st_size}, expected {len(f.model)}")
        if stat.S_IMODE(st.st_mode) != f.mode:
            raise Failure(f"stat {f.rel}: mode {stat.S_IMODE(st.st_mode):o}, "
                          f"expected {f.mode:o}")
        if f.fd is not None:
            fst = os.fstat(f.fd)
            if fst.st_size != len(f.model) or fst.st_ino != st.st_ino:
                raise Failure(f"fstat {f.rel}: st_size {fst.st_size} st_ino {fst.st_ino}, "
                              f"expected {len(f.model)} and stat's {st.st_ino}")

    def verify_file(self, f, why):
        self.check_stat(f)
        self.check_bytes(f"whole-file read of {f.rel} ({why})", 0, bytes(f.model),
                         read_whole(self.path(f)))

    def verify_all(self, why):
        for f in self.files:
            self.verify_file(f, why)
        if self.watchdog:
            self.watchdog.kick()

    def verify_retired(self):
        for rel, size, mode, digest in self.retired:
            path = self.union.path(rel)
            st = os.stat(path)
            if (st.st_size, stat.S_IMODE(st.st_mode)) != (size, mode):
                raise Failure(f"retired {rel}: size {st.st_size} mode "
                              f"{stat.S_IMODE(st.st_mode):o}, expected {size} and {mode:o}")
            if hashlib.sha256(read_whole(path)).digest() != digest:
                raise Failure(f"retired {rel}: content changed since it was retired")

    def remount_and_verify(self):
        self.note("remount", self.files[0], extra="(all descriptors closed)")
        self.close_all()
        self.union.remount()
        self.verify_all(f"after unmount and mount at op {self.opno}")
        self.verify_retired()

    def verify_upper_layer(self):
        """Each file copied up with its data holds the model's bytes in the upper layer."""
        for f in self.files:
            upper = os.path.join(self.union.upper, f.rel)
            try:
                os.getxattr(upper, "trusted.overlay.metacopy")
                continue  # metadata-only copy-up: the data is still the lower's
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # never modified: it is still the lower file
            self.check_bytes(f"upper layer file {f.rel}", 0, bytes(f.model), read_whole(upper))

    # ---- operations

    def op_pwrite(self, f):
        length = self.pick_length()
        offset = self.pick_write_offset(len(f.model), length)
        data = self.rng.randbytes(length)
        self.note("pwrite", f, offset, length)
        written = os.pwrite(self.rw_fd(f), data, offset)
        if written != length:
            raise Failure(f"pwrite returned {written}, expected {length}")
        apply_write(f.model, offset, data)

    def op_pread(self, f):
        offset = self.pick_read_offset(len(f.model))
        length = self.pick_length()
        through_new_fd = self.rng.random() < 0.3 or f.fd is None
        cold = self.rng.random() < 0.2
        self.note("pread", f, offset, length, ("fresh O_RDONLY fd" if through_new_fd else "")
                  + (" cold cache" if through_new_fd and cold else ""))
        if through_new_fd:
            self.check_read_through(f, self.path(f), offset, length, f"read of {f.rel}", cold)
        else:
            self.check_bytes(f"pread of {f.rel}", offset, bytes(f.model[offset:offset + length]),
                             os.pread(f.fd, length, offset))

    def op_truncate(self, f):
        size = len(f.model)
        r = self.rng.random()
        if r < 0.1:
            new_size = self.rng.randint(0, 64 * KiB)
        elif r < 0.55:
            new_size = self.rng.randint(size // 2, size)
        else:
            new_size = self.rng.randint(size, min(MAX_FILE_SIZE, size + 256 * KiB))
        by_path = self.rng.random() < 0.3 or f.fd is None
        self.note("truncate", f, extra=f"size {size} -> {new_size}"
                  + (" by path" if by_path else " ftruncate"))
        if by_path:
            os.truncate(self.path(f), new_size)
        else:
            os.ftruncate(f.fd, new_size)
        resize(f.model, new_size)

    def op_fallocate(self, f):
        mode_name = self.rng.choice(list(FALLOCATE_MODES))
        length = self.rng.randint(1, 4 * MAX_IO)
        offset = self.pick_write_offset(len(f.model), length)
        self.note("fallocate", f, offset, length, mode_name)
        if mode_name in self.unsupported:
            return
        fd = self.rw_fd(f)
        if libc.fallocate(fd, FALLOCATE_MODES[mode_name], offset, length) != 0:
            err = ctypes.get_errno()
            if err == errno.EOPNOTSUPP:
                print(f"  note: fallocate mode {mode_name} -> EOPNOTSUPP on "
                      f"{self.union.target}; skipping that mode from now on")
                self.unsupported.add(mode_name)
                return
            raise OSError(err, f"fallocate {mode_name}: {os.strerror(err)}")
        self.apply_fallocate(f.model, mode_name, offset, length)

    @staticmethod
    def apply_fallocate(model, mode_name, offset, length):
        end = offset + length
        if mode_name == "0":                       # allocate: zeros past EOF, size grows
            if end > len(model):
                resize(model, end)
        elif mode_name == "PUNCH_HOLE|KEEP_SIZE":  # zeros inside the file, size unchanged
            stop = min(end, len(model))
            if offset < stop:
                model[offset:stop] = bytes(stop - offset)
        elif mode_name == "ZERO_RANGE":            # zeros, size grows
            if end > len(model):
                resize(model, end)
            model[offset:end] = bytes(length)
        # KEEP_SIZE: preallocation only, nothing visible changes

    def mapped_range(self, f):
        """(offset, length) of a random range inside the file; None for an empty file."""
        size = len(f.model)
        if size == 0:
            return None
        offset = self.rng.randrange(size)
        return offset, min(self.pick_length(), size - offset)

    def with_mapping(self, fd, offset, length, use, writable):
        """Calls use(mapping, start) on a MAP_SHARED mapping of `fd` covering
        [offset, offset+length); the range starts at `start` in the mapping."""
        map_offset = offset - offset % PAGE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        with mmap.mmap(fd, offset + length - map_offset, flags=mmap.MAP_SHARED, prot=prot,
                       offset=map_offset) as mapping:
            return use(mapping, offset - map_offset)

    def op_mmap_read(self, f):
        picked = self.mapped_range(f)
        if picked is None:
            return
        offset, length = picked
        # without an open descriptor: a read-only mapping that does not copy the file up
        self.note("mmap-read", f, offset, length, "" if f.fd is not None else "O_RDONLY fd")
        fd = f.fd if f.fd is not None else os.open(self.path(f), os.O_RDONLY)
        try:
            got = self.with_mapping(fd, offset, length, lambda m, s: m[s:s + length], False)
        finally:
            if fd != f.fd:
                os.close(fd)
        self.check_bytes(f"mmap read of {f.rel}", offset,
                         bytes(f.model[offset:offset + length]), got)

    def op_mmap_write(self, f):
        picked = self.mapped_range(f)
        if picked is None:
            return
        offset, length = picked
        data = self.rng.randbytes(length)
        self.note("mmap-write", f, offset, length, "+ msync")

        def store_and_sync(mapping, start):
            mapping[start:start + length] = data
            mapping.flush()  # msync(MS_SYNC)

        self.with_mapping(self.rw_fd(f), offset, length, store_and_sync, writable=True)
        apply_write(f.model, offset, data)

    def op_append(self, f):
        length = self.pick_length()
        data = self.rng.randbytes(length)
        if len(f.model) + length > MAX_FILE_SIZE:
            return
        self.note("append", f, len(f.model), length, "O_APPEND fd")
        fd = os.open(self.path(f), os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != length:
            raise Failure(f"O_APPEND write returned {written}, expected {length}")
        f.model += data

    def op_copy_range(self, dst):
        src = self.rng.choice([g for g in self.files if g is not dst])
        length = self.pick_length()
        src_offset = self.rng.randint(0, len(src.model))
        dst_offset = self.pick_write_offset(len(dst.model), length)
        self.note("copy_range", dst, dst_offset, length, f"from {src.rel} offset {src_offset}")
        expected = bytes(src.model[src_offset:src_offset + length])
        src_fd, dst_fd = self.rw_fd(src), self.rw_fd(dst)
        copied = 0
        while copied < len(expected):  # may legitimately copy less per call
            n = os.copy_file_range(src_fd, dst_fd, len(expected) - copied,
                                   src_offset + copied, dst_offset + copied)
            if n == 0:
                break
            copied += n
        if copied != len(expected):
            raise Failure(f"copy_file_range copied {copied} bytes, expected {len(expected)}")
        apply_write(dst.model, dst_offset, expected)

    def op_fsync(self, f):
        data_only = self.rng.random() < 0.5
        self.note("fdatasync" if data_only else "fsync", f)
        (os.fdatasync if data_only else os.fsync)(self.rw_fd(f))

    def op_reopen(self, f):
        """Closes the descriptor; reopens it now (sometimes with O_TRUNC) or on next use."""
        r = self.rng.random()
        action = "close" if r < 0.4 else "reopen O_TRUNC" if r < 0.5 else "reopen"
        self.note(action, f)
        if f.fd is not None:
            os.close(f.fd)
            f.fd = None
        if action == "reopen O_TRUNC":
            f.fd = os.open(self.path(f), os.O_RDWR | os.O_TRUNC)
            f.model.clear()
        elif action == "reopen":
            f.fd = os.open(self.path(f), os.O_RDWR)

    def check_read_through(self, f, path, offset, length, what, cold=False):
        """Reads [offset, offset+length) through a new descriptor on `path`; `cold` drops the
        file's cached pages first, so that the read reaches the filesystem (through FUSE the
        page cache would otherwise answer from what an earlier read fetched)."""
        with open(path, "rb", buffering=0) as fresh:
            if cold:
                os.posix_fadvise(fresh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            fresh.seek(offset)
            got = fresh.read(length)
        self.check_bytes(what + (" (cold cache)" if cold else ""), offset,
                         bytes(f.model[offset:offset + length]), got)

    def op_rename(self, f):
        target = self.rng.choice([p for p in f.places() if p != f.rel])
        offset, length = self.pick_read_offset(len(f.model)), self.pick_length()
        self.note("rename", f, offset, length, f"-> {target}, then read through the new name")
        old = self.path(f)
        os.rename(old, self.union.path(target))
        f.rel = target
        if os.path.lexists(old):
            raise Failure(f"{old} still exists after renaming it to {target}")
        self.check_read_through(f, self.path(f), offset, length, f"read after rename to {target}",
                                cold=True)

    def op_link_unlink(self, f):
        """Adds a second name, reads through it, removes one of the two names (usually the
        new one) and reads the whole file through the name that is left."""
        link_rel = self.rng.choice([p for p in (f"data/{f.name}.link", f"other/{f.name}.link")
                                    if p != f.rel])
        drop_original = self.rng.random() < 0.3
        offset, length = self.pick_read_offset(len(f.model)), self.pick_length()
        self.note("link+unlink", f, offset, length,
                  f"second name {link_rel}, read through it, unlink "
                  + ("the original name" if drop_original else "it") + ", read all")
        path, link = self.path(f), self.union.path(link_rel)
        os.link(path, link)
        st, lst = os.stat(path), os.stat(link)
        if (st.st_ino, st.st_nlink, st.st_size) != (lst.st_ino, 2, len(f.model)):
            raise Failure(f"after link: {f.rel} ino={st.st_ino} nlink={st.st_nlink}, {link_rel} "
                          f"ino={lst.st_ino} nlink={lst.st_nlink} size={lst.st_size}; "
                          f"expected the same inode, nlink 2, size {len(f.model)}")
        self.check_read_through(f, link, offset, length, f"read through new link {link_rel}")
        gone, kept = (path, link) if drop_original else (link, path)
        os.unlink(gone)
        if drop_original:
            f.rel = link_rel
        if os.stat(kept).st_nlink != 1 or os.path.lexists(gone):
            raise Failure(f"after unlink of {gone}: nlink of {kept} is "
                          f"{os.stat(kept).st_nlink}, {gone} exists={os.path.lexists(gone)}")
        self.check_read_through(f, kept, 0, len(f.model), f"read of {f.rel} after unlink of "
                                f"the other name", cold=True)

    def op_chmod(self, f):
        mode = self.rng.choice([0o600, 0o640, 0o644, 0o664, 0o666, 0o700, 0o755])
        by_fd = self.rng.random() < 0.5 and f.fd is not None
        self.note("chmod", f, extra=f"{mode:o}" + (" fchmod" if by_fd else ""))
        if by_fd:
            os.fchmod(f.fd, mode)
        else:
            os.chmod(self.path(f), mode)
        f.mode = mode


def run_fsx(args, scratch):
    """One fsx run; returns [(test name, passed)]."""
    name = f"fsx {args.target} seed={args.seed} ops={args.ops}"
    union = Union(args.target, args.binary, os.path.join(scratch, "fsx"), args.options)
    long_lived, newcomers = make_fsx_layers(union, args.seed, args.ops // args.fresh_every + 1)
    watchdog = Watchdog(union)
    fsx = Fsx(union, long_lived, newcomers, args.seed, args.fresh_every, trace=args.trace,
              watchdog=watchdog, without=args.without)
    print(f"== {name}: {', '.join(f.rel for f in long_lived)} and {len(newcomers)} newcomers "
          f"(one every {args.fresh_every} ops) start in the lower layers; whole-file check "
          f"every {args.verify_every} ops, remount every {args.remount_every} ops", flush=True)
    started = time.monotonic()
    passed = False
    try:
        union.mount()
        watchdog.start()
        fsx.run(args.ops, args.verify_every, args.remount_every)
        passed = True
    except Exception as e:  # a mismatch, an errno or a crash of this script: all failures
        hung = " (the watchdog killed the daemon after a hang)" if watchdog.fired else ""
        print(fsx.failure_report(f"{type(e).__name__}: {e}{hung}"))
    finally:
        watchdog.stopped.set()
        try:
            fsx.close_all()
        except OSError:
            pass
        problem = union.unmount()
        if problem and passed:
            print(f"FAIL at unmount: {problem}")
            passed = False
    elapsed = time.monotonic() - started
    print(f"{fsx.opno} ops in {elapsed:.1f} s ({fsx.opno / elapsed:.0f} ops/s)")
    print("op mix: " + ", ".join(f"{op}={n}" for op, n in sorted(fsx.counts.items())))
    if fsx.unsupported:
        print("skipped fallocate modes (EOPNOTSUPP): " + ", ".join(sorted(fsx.unsupported)))
    return [(name, passed)]


# ---------------------------------------------------------------- fio

class FioJob:
    """A fio write job with crc32c verification on `rel`; `lower` files exist in a lower layer
    (of `size` bytes) and fio overwrites only [offset, offset+region) of them."""

    def __init__(self, name, rel, fio_args, region, offset=0, lower_layer=None, size=None):
        self.name, self.rel, self.fio_args = name, rel, fio_args
        self.region, self.offset = region, offset
        self.lower_layer, self.size = lower_layer, size
        self.original = None  # the lower file's bytes

    def command(self, path, verify_only=False):
        cmd = ["fio", f"--name={self.name}", f"--filename={path}", f"--size={self.region}",
               f"--offset={self.offset}", "--ioengine=psync", "--verify=crc32c",
               "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1",
               "--end_fsync=1"]
        return cmd + self.fio_args + (["--verify_only=1"] if verify_only else [])


def fio_jobs(size):
    half = size // 2
    return [
        FioJob("seq-write-new", "fio/seq-new", ["--rw=write", "--bsrange=1k-64k"], size),
        FioJob("rand-write-new", "fio/rand-new", ["--rw=randwrite", "--bs=4k"], size),
        FioJob("mmap-randwrite-new", "fio/mmap-new",
               ["--ioengine=mmap", "--rw=randwrite", "--bs=4k"], half),
        FioJob("seq-overwrite-lower", "data/lower-seq", ["--rw=write", "--bs=64k"], half,
               offset=1 * MiB, lower_layer="l2", size=size),
        FioJob("rand-overwrite-lower", "data/lower-rand", ["--rw=randwrite", "--bs=4k"], half,
               offset=1 * MiB, lower_layer="l1", size=size),
    ]


def run_fio_job(union, job, verify_only):
    """Runs the job; returns a failure description or None."""
    p = subprocess.run(job.command(union.path(job.rel), verify_only), capture_output=True,
                       text=True, timeout=600, cwd=union.root)  # fio may leave files in cwd
    output = p.stdout + p.stderr
    if p.returncode != 0 or re.search(r"err=\s*[1-9]", output) or "verify:" in output:
        tail = "\n".join("    " + line for line in output.strip().splitlines()[-15:])
        return f"fio exited with status {p.returncode}:\n{tail}"
    if job.original is not None:
        with open(union.path(job.rel), "rb") as f:
            content = f.read()
        end = job.offset + job.region
        for lo, hi in ((0, job.offset), (end, job.size)):
            if content[lo:hi] != job.original[lo:hi] or len(content) != job.size:
                return ("bytes fio did not write are not the lower file's any more\n"
                        + describe_difference(f"{job.rel} [{lo}, {hi})", lo,
                                              job.original[lo:hi], content[lo:hi]))
    return None


def run_fio(args, scratch):
    """The fio jobs, then all of them again with --verify_only after a remount."""
    size = args.fio_size * MiB
    union = Union(args.target, args.binary, os.path.join(scratch, "fio"), args.options)
    jobs = fio_jobs(size)
    rng = random.Random(f"fio-{args.seed}")
    for job in jobs:
        if job.lower_layer:
            job.original = rng.randbytes(job.size)
            write_layer_file(os.path.join(union.root, job.lower_layer, job.rel), job.original,
                             0o644)
    os.makedirs(os.path.join(union.l2, "data"), exist_ok=True)
    print(f"== fio on {args.target} (--verify=crc32c, {args.fio_size} MiB files)", flush=True)
    results = []
    try:
        union.mount()
        os.makedirs(union.path("fio"))
        for verify_only in (False, True):
            if verify_only:
                union.remount()
            for job in jobs:
                name = f"fio {args.target} {job.name}" + (
                    " (verify_only after remount)" if verify_only else "")
                started = time.monotonic()
                problem = run_fio_job(union, job, verify_only)
                print(f"{'PASS' if not problem else 'FAIL'} {name} "
                      f"({time.monotonic() - started:.1f} s)", flush=True)
                if problem:
                    print("  " + problem)
                results.append((name, problem is None))
    except Exception as e:
        print(f"FAIL fio on {args.target}: {type(e).__name__}: {e}")
        results.append((f"fio {args.target}", False))
    finally:
        problem = union.unmount()
        if problem:
            print(f"FAIL fio unmount: {problem}")
            results.append((f"fio {args.target} unmount", False))
    return results


# ---------------------------------------------------------------- main

def remove_scratch(scratch):
    for point in mounts_under(scratch):
        for cmd in (["umount", point], ["umount", "-l", point]):
            if is_mounted(point):
                run_quietly(cmd)
    if mounts_under(scratch):
        print(f"warning: {scratch} still has mounts; not removing it")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def parse_args():
    ap = argparse.ArgumentParser(
        description="fsx-style random data-integrity test for stratafs (see the docstring)")
    ap.add_argument("--binary", default=DEFAULT_BINARY, help="stratafs binary")
    ap.add_argument("--target", choices=("stratafs", "kernel"), default="stratafs")
    ap.add_argument("--options", default="",
                    help="more -o options for stratafs (not kernel overlayfs), e.g. "
                         "passthrough=off: reads and writes through the daemon")
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--verify-every", type=int, default=500)
    ap.add_argument("--remount-every", type=int, default=20_000)
    ap.add_argument("--fresh-every", type=int, default=500,
                    help="ops between newcomers (fresh lower files)")
    ap.add_argument("--trace", action="store_true", help="print every operation")
    ap.add_argument("--without", action="append", default=[], metavar="OP",
                    choices=OPERATIONS, help="leave an operation out (to look past a known "
                    "bug); may repeat: " + ", ".join(OPERATIONS))
    ap.add_argument("--no-fio", action="store_true", help="skip the fio jobs")
    ap.add_argument("--fio-size", type=int, default=32, help="fio file size in MiB")
    return ap.parse_args()


OPERATIONS = sorted(name.removeprefix("op_") for name in vars(Fsx) if name.startswith("op_"))


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main():
    args = parse_args()
    if os.geteuid() != 0 or (args.target == "stratafs" and not os.path.exists("/dev/fuse")):
        print("SKIP fsx: needs root (and /dev/fuse for stratafs)")
        print("0 passed, 0 failed")
        return 0
    if args.target == "stratafs" and not os.access(args.binary, os.X_OK):
        print(f"FAIL: no stratafs binary at {args.binary} (build it, or pass --binary)")
        print("0 passed, 1 failed")
        return 1
    common.enter_private_mount_namespace()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="fsx-", dir=args.dir)
    results = []
    try:
        results += run_fsx(args, scratch)
        if args.no_fio:
            pass
        elif shutil.which("fio") is None:
            print("SKIP fio jobs: fio is not installed (apt-get install -y fio)")
        else:
            results += run_fio(args, scratch)
    except KeyboardInterrupt:
        print("interrupted")
        results.append(("interrupted", False))
    finally:
        remove_scratch(scratch)
    failed = [name for name, ok in results if not ok]
    for name in failed:
        print(f"FAILED: {name}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
