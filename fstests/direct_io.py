#!/usr/bin/env python3
"""O_DIRECT reads (and with `write`, writes) of one file, printing what each call returned
or its errno, so that a write-suite scenario can compare them between kernel overlayfs and
stratafs.

Why: without passthrough every read and write goes through the daemon, whose buffers are
its own; the real filesystem refuses direct I/O from a misaligned buffer (EINVAL) where
kernel overlayfs hands it the caller's aligned one. Misaligned offsets and lengths must
still fail as they do on the kernel's overlay.

Usage: python3 direct_io.py PATH read|write
"""

import errno
import hashlib
import mmap
import os
import sys

PATTERN = bytes(i % 251 for i in range(8192))


def attempt(label, call):
    try:
        print(label, call())
    except OSError as e:
        print(label, "error", errno.errorcode.get(e.errno, e.errno))


def main():
    path, mode = sys.argv[1], sys.argv[2]
    access = os.O_RDWR if mode == "write" else os.O_RDONLY
    fd = os.open(path, access | os.O_DIRECT)
    # Anonymous mappings are page-aligned, as direct I/O wants its buffers.
    buf = mmap.mmap(-1, 16384)
    if mode == "write":
        buf[:8192] = PATTERN
        attempt("write aligned", lambda: os.pwritev(fd, [memoryview(buf)[:8192]], 4096))
        attempt("write at unaligned offset", lambda: os.pwritev(fd, [memoryview(buf)[:4096]], 1))
        attempt("write of unaligned length", lambda: os.pwritev(fd, [memoryview(buf)[:100]], 0))

    def read_at(offset, size):
        got = os.preadv(fd, [memoryview(buf)[:size]], offset)
        return got, hashlib.md5(buf[:got]).hexdigest()

    attempt("read from 0", lambda: read_at(0, 16384))
    attempt("read from 4096", lambda: read_at(4096, 4096))
    attempt("read past the end", lambda: read_at(1 << 20, 4096))
    attempt("read at unaligned offset", lambda: read_at(1, 4096))
    os.close(fd)


if __name__ == "__main__":
    main()
