"""The model behind fstests/crashloop.py: what the merged tree may look like after the daemon
was SIGKILLed in the middle of a workload, and a description of what it does look like.

The workload journals every operation (outside the mount) before it starts it ("B") and
after it returned ("D", or "E errno"). Replaying the journal on the model of the lower
layers gives the state after the last finished operation; the one operation in flight at
the kill may have happened or not, so two whole-tree states are acceptable, the old and the
new. Whole trees, not path by path: a rename over a file is acceptable as "source there,
destination old" or "source gone, destination new", never "both gone".

What an operation that returned before the kill promises. A SIGKILL of the daemon is not a
power loss: whatever the daemon did in the upper layer before it died stays in the host's page
cache. So every namespace and metadata operation that returned (create, unlink, mkdir, rmdir,
rename, link, symlink, mkfifo, xattrs, chmod, chown, utimes) must show after the remount.
File data follows POSIX: only data that was synced (fsync or fdatasync of the file, syncfs) is
promised, so a file may show any content it had since its last sync (`Obj.states`). stratafs
has no FUSE writeback cache, so an older content is reported (a note), not failed.

File content is self-describing: each 4 KiB block holds "FID:INDEX:GEN;" repeated (FID the
file's identity, which follows it through renames and hard links, GEN the operation that wrote
it, 0 for the lower layer's data), possibly cut short and followed by zeros (truncation), or
only zeros. So a half copy, a zeroed, misplaced or foreign block, or a lost write shows, and
says which block it is.
"""

import errno
import json
import os
import re
import stat

BLOCK = 4096
LOWER_MTIME_NS = 1_000_000_000_000_000_000  # every lower object's mtime (copy-up keeps it)
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
DEATH = (errno.ENOTCONN, errno.ECONNABORTED)  # what a call on a mount whose daemon died gets
TAG_RE = re.compile(rb"([A-Za-z0-9_]+):(\d+):(\d+);")


# ---------------------------------------------------------------- self-describing content

def pattern(fid, idx, gen):
    """Block `idx` of file `fid` as written by operation `gen`."""
    unit = f"{fid}:{idx}:{gen};".encode()
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def content_bytes(desc):
    """The bytes of a content description (size, blocks)."""
    size, blocks = desc
    out = bytearray(size)
    for i, b in enumerate(blocks):
        if b:
            out[i * BLOCK:i * BLOCK + b[2]] = pattern(b[0], i, b[1])[:b[2]]
    return bytes(out)


def nblocks(size):
    return (size + BLOCK - 1) // BLOCK


def truncated(desc, size):
    """`desc` cut or extended (with zeros) to `size` bytes."""
    old, blocks = desc
    n = nblocks(size)
    out = list(blocks[:n]) + [None] * (n - len(blocks))
    if n and size < old and out[-1]:
        fid, gen, valid = out[-1]
        valid = min(valid, size - (n - 1) * BLOCK)
        out[-1] = (fid, gen, valid) if valid else None
    return (size, tuple(out))


def written(desc, fid, idx, gen):
    """`desc` after a whole block `idx` written by operation `gen`."""
    size = max(desc[0], (idx + 1) * BLOCK)
    _, blocks = truncated(desc, size)
    blocks = list(blocks)
    blocks[idx] = (fid, gen, BLOCK)
    return (size, tuple(blocks))


def punched(desc, first, count):
    """`desc` with blocks first..first+count zeroed (a hole punched, the size kept)."""
    size, blocks = desc
    blocks = list(blocks)
    for i in range(first, min(first + count, len(blocks))):
        blocks[i] = None
    return (size, tuple(blocks))


def parse(data):
    """The content description of `data`; a block that is no written block is ("?", why)."""
    blocks = []
    for i in range(0, len(data), BLOCK):
        chunk = data[i:i + BLOCK]
        body = chunk.rstrip(b"\0")
        if not body:
            blocks.append(None)
            continue
        m = TAG_RE.match(body)
        if not m:  # too short to say whose it is (see canonical()), or garbage
            blocks.append(("raw", body) if len(body) < 40 else
                          ("?", f"block {i // BLOCK}: garbage {body[:24]!r}"))
            continue
        fid, idx, gen = m.group(1).decode(), int(m.group(2)), int(m.group(3))
        if idx != i // BLOCK:
            blocks.append(("?", f"block {i // BLOCK}: holds {fid}'s block {idx}"))
        elif body != pattern(fid, idx, gen)[:len(body)]:
            blocks.append(("?", f"block {i // BLOCK}: {fid}:{gen} mixed with other data"))
        else:
            blocks.append((fid, gen, len(body)))
    return (len(data), tuple(blocks))


def canonical(desc):
    """`desc` as parse() describes it: a block cut shorter than its tag is its raw bytes."""
    size, blocks = desc
    if all(not b or b[2] >= 32 for b in blocks):
        return desc
    return (size, tuple(("raw", pattern(b[0], i, b[1])[:b[2]])
                        if b and b[2] < len(f"{b[0]}:{i}:{b[1]};") else b
                        for i, b in enumerate(blocks)))


def summary(desc):
    """A short text for a content description: runs of blocks."""
    size, blocks = desc
    runs = []
    for i, b in enumerate(blocks):
        if b and b[0] == "?":
            key = b[1]
        elif b and b[0] == "raw":
            key = repr(b[1])
        elif b:
            key = f"{b[0]}:{b[1]}" + (f"[{b[2]}]" if b[2] != BLOCK else "")
        else:
            key = "zeros"
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    text = ",".join(k if n == 1 else f"{k}x{n}" for k, n in runs[:6])
    return f"{size}B[{text}{',...' if len(runs) > 6 else ''}]"


# ---------------------------------------------------------------- the model

class Obj:
    """One object of the merged tree. `states`: the contents a file may show (the last one
    is the current, the first the last synced); `mtime`: None when not predictable."""
    __slots__ = ("kind", "mode", "uid", "gid", "xattrs", "mtime", "states", "target")

    def __init__(self, kind, mode, states=None, target=None, mtime=None, xattrs=None):
        self.kind, self.mode, self.uid, self.gid = kind, mode, 0, 0
        self.xattrs = dict(xattrs or {})
        self.mtime, self.states, self.target = mtime, list(states or []), target

    def copy(self):
        o = Obj(self.kind, self.mode, self.states, self.target, self.mtime, self.xattrs)
        o.uid, o.gid = self.uid, self.gid
        return o


class Model:
    """The merged tree: path (relative, "" the root) -> object id, and the objects."""

    def __init__(self):
        self.paths, self.objs, self.kids = {"": "root"}, {"root": Obj("d", 0o755)}, {"": set()}

    def copy(self):
        m = Model()
        m.paths = dict(self.paths)
        m.objs = {k: v.copy() for k, v in self.objs.items()}
        m.kids = {k: set(v) for k, v in self.kids.items()}
        return m

    def obj(self, path):
        return self.objs[self.paths[path]]

    def add(self, path, fid, obj=None):
        if obj is not None:
            self.objs[fid] = obj
        self.paths[path] = fid
        self.kids[os.path.dirname(path)].add(os.path.basename(path))
        if self.objs[fid].kind == "d":
            self.kids.setdefault(path, set())

    def subtree(self, path):
        """`path` and everything below it, parents first."""
        out = [path]
        for name in sorted(self.kids.get(path, ())):
            out += self.subtree(f"{path}/{name}" if path else name)
        return out

    def remove(self, path):
        for p in reversed(self.subtree(path)):
            fid = self.paths.pop(p)
            self.kids.pop(p, None)
            if fid not in self.paths.values() or self.objs[fid].kind == "d":
                self.objs.pop(fid, None)
        self.kids[os.path.dirname(path)].discard(os.path.basename(path))

    def move(self, src, dst):
        moved = [(p, self.paths[p]) for p in self.subtree(src)]
        kids = {p: self.kids[p] for p, _ in moved if p in self.kids}
        for p, _ in reversed(moved):
            del self.paths[p]
            self.kids.pop(p, None)
        self.kids[os.path.dirname(src)].discard(os.path.basename(src))
        for p, fid in moved:
            q = dst + p[len(src):]
            self.paths[q] = fid
            if p in kids:
                self.kids[q] = kids[p]
        self.kids[os.path.dirname(dst)].add(os.path.basename(dst))

    def of_kind(self, kinds):
        return [p for p, f in self.paths.items() if p and self.objs[f].kind in kinds]


# ---------------------------------------------------------------- operations on the model

def _data(m, path, new):
    o = m.obj(path)
    o.states.append(new(o.states[-1], m.paths[path]))
    o.mtime = None


def _rename(m, op):
    src, dst, flags = op["src"], op["dst"], op.get("flags", 0)
    if flags & RENAME_EXCHANGE:
        m.move(src, "\0tmp")
        m.move(dst, src)
        m.move("\0tmp", dst)
    elif dst in m.paths and m.paths[dst] == m.paths[src] and m.obj(src).kind != "d":
        pass  # two names of one file: rename does nothing
    else:
        if dst in m.paths:
            m.remove(dst)
        m.move(src, dst)


def apply(m, op):
    """Changes model `m` as operation `op` (a journal entry) does when it succeeds."""
    k, p = op["op"], op.get("path")
    if op.get("expect"):
        return  # an operation meant to fail changes nothing
    if k == "create":
        m.add(p, op["fid"], Obj("f", 0o644, [(0, ())]))
    elif k == "write":
        _data(m, p, lambda d, fid: written(d, fid, op["idx"], op["n"]))
    elif k == "truncate":
        _data(m, p, lambda d, fid: truncated(d, op["size"]))
    elif k == "fallocate":
        mode, off, ln = op["mode"], op["off"], op["len"]
        m.obj(p).mtime = None  # even one that changes nothing stamps the file
        if mode & FALLOC_PUNCH_HOLE:
            _data(m, p, lambda d, fid: punched(d, off // BLOCK, ln // BLOCK))
        elif not mode & FALLOC_KEEP_SIZE and off + ln > m.obj(p).states[-1][0]:
            _data(m, p, lambda d, fid: truncated(d, off + ln))
    elif k in ("fsync", "fdatasync"):
        o = m.obj(p)
        o.states = o.states[-1:]
        if op.get("via") == "wo":
            o.mtime = None  # an open for write ends a metadata-only copy-up: the kernel's
            # overlayfs stamps the file then
    elif k == "syncfs":
        for o in m.objs.values():
            o.states = o.states[-1:]
    elif k in ("unlink", "rmdir"):
        m.remove(p)
    elif k == "mkdir":
        m.add(p, op["fid"], Obj("d", 0o755))
    elif k == "rename":
        _rename(m, op)
    elif k == "link":
        m.add(op["dst"], m.paths[op["src"]])
    elif k == "symlink":
        m.add(p, op["fid"], Obj("l", 0o777, target=op["target"]))
    elif k == "mkfifo":
        m.add(p, op["fid"], Obj("p", 0o644))
    elif k == "setxattr":
        m.obj(p).xattrs[op["name"]] = op["value"]
    elif k == "removexattr":
        m.obj(p).xattrs.pop(op["name"], None)
    elif k == "chmod":
        m.obj(p).mode = op["mode"]
    elif k == "chown":
        o = m.obj(p)
        o.uid, o.gid = op["uid"], op["gid"]
    elif k == "utime":
        m.obj(p).mtime = op["mtime"]
    elif k not in ("fsyncdir",):
        raise ValueError(f"unknown operation {k}")


# ---------------------------------------------------------------- the journal

def journal_line(tag, op=None, n=None, err=None):
    if tag == "B":
        return f"B {json.dumps(op, sort_keys=True)}\n"
    return f"{tag} {n}" + (f" {err}" if err is not None else "") + "\n"


def read_journal(path):
    """[(op, outcome)] in order; outcome "done", an errno, or None (no answer: in flight)."""
    entries, by_n = [], {}
    if not os.path.exists(path):
        return entries
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut by the kill
            tag, rest = line[0], line[2:].strip()
            if tag == "B":
                op = json.loads(rest)
                by_n[op["n"]] = len(entries)
                entries.append([op, None])
            else:
                parts = rest.split()
                entries[by_n[int(parts[0])]][1] = "done" if tag == "D" else int(parts[1])
    return entries


def replay(initial, entries):
    """(acceptable models, in-flight op or None, problems, {object id: [indexes of the
    entries that named it]}) after the journaled operations."""
    m, problems, inflight, touched = initial.copy(), [], None, {}
    for i, (op, outcome) in enumerate(entries):
        last = i == len(entries) - 1
        for key in ("path", "src", "dst"):
            if op.get(key) in m.paths:
                touched.setdefault(m.paths[op[key]], []).append(i)
        if outcome == "done":
            if op.get("expect"):
                problems.append(f"op {describe_op(op)} succeeded, expected "
                                f"{errno.errorcode[op['expect']]}")
            apply(m, op)
        elif outcome is None or outcome in DEATH or (last and outcome != op.get("expect")):
            inflight = op
        elif outcome != op.get("expect") and outcome not in op.get("allow", ()):
            problems.append(f"op {describe_op(op)} failed with "
                            f"{errno.errorcode.get(outcome, outcome)} while the daemon was alive")
    if inflight is None:
        return [m], None, problems, touched
    new = m.copy()
    apply(new, inflight)
    return [m, new], inflight, problems, touched


def describe_op(op):
    keys = [k for k in ("path", "src", "dst", "idx", "size", "mode", "off", "len", "flags",
                        "name", "uid", "gid", "target", "via") if k in op]
    args = " ".join(f"{k}={oct(op[k]) if k == 'mode' and op['op'] == 'chmod' else op[k]}"
                    for k in keys)
    return f"#{op['n']} {op['op']} {args}".rstrip()


def ops_touching(entries, path, touched, fids, limit=5):
    """The last journal entries that name `path` (or a directory above it) or that named
    one of the objects `fids` under any name."""
    out = []
    mine = {i for fid in fids for i in touched.get(fid, ())}
    for i, (op, outcome) in enumerate(entries):
        names = [op.get(k) for k in ("path", "src", "dst")]
        if i in mine or any(x and (path == x or path.startswith(x + "/")) for x in names):
            state = "done" if outcome == "done" else (
                "in flight" if outcome is None else errno.errorcode.get(outcome, outcome))
            out.append(f"{describe_op(op)} ({state})")
    return out[-limit:]


# ---------------------------------------------------------------- observing the merged tree

def observe(root):
    """path -> what the merged tree shows there: type, mode, owner, inode, link count, mtime,
    user.* xattrs, parsed content or symlink target, or the error of reading it."""
    out = {}

    def visit(path):
        full = os.path.join(root, path) if path else root
        try:
            st = os.lstat(full)
            o = {"kind": {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l",
                          stat.S_IFIFO: "p"}.get(stat.S_IFMT(st.st_mode), "?"),
                 "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                 "ino": st.st_ino, "nlink": st.st_nlink, "mtime": st.st_mtime_ns}
            if o["kind"] in "fd":
                o["xattrs"] = {n: os.getxattr(full, n).decode()
                               for n in os.listxattr(full) if n.startswith("user.")}
            if o["kind"] == "f":
                with open(full, "rb") as f:
                    o["content"] = parse(f.read())
            elif o["kind"] == "l":
                o["target"] = os.readlink(full)
        except OSError as e:
            out[path] = {"kind": "error", "error": f"{e.strerror} ({e.errno})"}
            return
        out[path] = o
        if o["kind"] == "d":
            try:
                names = sorted(os.listdir(full))
            except OSError as e:
                out[path] = {"kind": "error", "error": f"readdir: {e.strerror}"}
                return
            for n in names:
                visit(f"{path}/{n}" if path else n)

    visit("")
    return out


# ---------------------------------------------------------------- comparing

def show_obs(o):
    if o is None:
        return "missing"
    if o["kind"] == "error":
        return f"error {o['error']}"
    text = f"{o['kind']} {o['mode']:o} {o['uid']}:{o['gid']}"
    if o.get("xattrs"):
        text += f" {o['xattrs']}"
    if "content" in o:
        text += f" {summary(o['content'])}"
    if "target" in o:
        text += f" -> {o['target']}"
    return text


def show_obj(m, path):
    if path not in m.paths:
        return "missing"
    o = m.obj(path)
    text = f"{o.kind} {o.mode:o} {o.uid}:{o.gid}"
    if o.xattrs:
        text += f" {o.xattrs}"
    if o.kind == "f":
        text += " " + " or ".join(summary(s) for s in o.states[-3:])
        if len(o.states) > 3:
            text += f" (or {len(o.states) - 3} older unsynced)"
    if o.target:
        text += f" -> {o.target}"
    if o.mtime is not None:
        text += f" mtime={o.mtime}"
    return text


def _differs(m, path, o, links):
    """Why observation `o` of `path` is not what model `m` has there (None: it is)."""
    if o is None or path not in m.paths:
        return "missing" if o is None else "not expected"
    if o["kind"] == "error":
        return o["error"]
    x = m.obj(path)
    if o["kind"] != x.kind:
        return "wrong type"
    if x.kind != "l" and (o["mode"], o["uid"], o["gid"]) != (x.mode, x.uid, x.gid):
        return "wrong mode or owner"
    if x.kind in "fd" and o["xattrs"] != x.xattrs:
        return "wrong xattrs"
    if x.kind == "l" and o["target"] != x.target:
        return "wrong symlink target"
    if x.mtime is not None and x.kind in "fp" and o["mtime"] != x.mtime:
        return f"mtime {o['mtime']}, expected {x.mtime}"
    if x.kind == "f":
        if o["content"] not in [canonical(s) for s in x.states]:
            return "content never written"
        if o["nlink"] != links[m.paths[path]]:
            return f"{o['nlink']} links, expected {links[m.paths[path]]}"
    return None


def mismatches(m, obs):
    """{path: why} where the observed tree is not model `m` (empty: it is), and how many files
    show an older unsynced content than their last write."""
    out, older, inos, links = {}, 0, {}, {}
    for fid in m.paths.values():
        links[fid] = links.get(fid, 0) + 1
    for path in sorted(set(m.paths) | set(obs)):
        why = _differs(m, path, obs.get(path), links)
        if why:
            out[path] = why
        elif m.obj(path).kind == "f":
            older += obs[path]["content"] != canonical(m.obj(path).states[-1])
            inos.setdefault(m.paths[path], set()).add((obs[path]["ino"], path))
    for fid, seen in inos.items():
        if len({i for i, _ in seen}) > 1:
            for _, path in seen:
                out[path] = "hard links show different inode numbers"
    return out, older


# ---------------------------------------------------------------- the lower layer

BIG = [f"f{n}" for n in range(6)]


def lower_spec(big_blocks):
    """The lower layer, as (path, fid, Obj): large files (copy-ups long enough to be killed
    in), small files (some with a user.* xattr), lower directories to rename, to empty and
    remove, empty ones to remove and recreate (opaque), symlinks and fifos."""
    out = []

    def d(path, **kw):
        out.append((path, f"dir_{path.replace('/', '_')}", Obj("d", 0o755, **kw)))

    def f(path, fid, size, **kw):
        blocks = tuple((fid, 0, min(BLOCK, size - i * BLOCK)) for i in range(nblocks(size)))
        out.append((path, fid, Obj("f", 0o644, [(size, blocks)], mtime=LOWER_MTIME_NS, **kw)))

    d("big")
    for fid in BIG:
        f(f"big/{fid}", fid, big_blocks * BLOCK)
    d("small")
    for i in range(300):
        f(f"small/s{i}", f"s{i}", 20 + i * 37 % 400,
          xattrs={"user.orig": f"s{i}"} if i % 7 == 0 else None)
    for t in range(3):
        d(f"tree{t}", xattrs={"user.dir": f"tree{t}"})
        d(f"tree{t}/sub")
        f(f"tree{t}/top", f"t{t}top", 5000)
        for i in range(20):
            f(f"tree{t}/sub/file{i}", f"t{t}x{i}", 100)
    d("dirs")
    for k in range(10):
        d(f"dirs/d{k}")
        for j in range(3):
            f(f"dirs/d{k}/x{j}", f"d{k}x{j}", 64 + j)
    d("empty")
    for k in range(10):
        d(f"empty/e{k}")
    d("links")
    for i in range(10):
        out.append((f"links/l{i}", f"l{i}", Obj("l", 0o777, target=f"../small/s{i}")))
    d("fifos")
    for i in range(5):
        out.append((f"fifos/p{i}", f"p{i}", Obj("p", 0o644, mtime=LOWER_MTIME_NS)))
    return out


def build_lower(root, spec):
    for path, fid, o in spec:
        full = os.path.join(root, path)
        if o.kind == "d":
            os.mkdir(full, o.mode)
        elif o.kind == "f":
            with open(full, "wb") as fh:
                fh.write(content_bytes(o.states[0]))
        elif o.kind == "l":
            os.symlink(o.target, full)
        elif o.kind == "p":
            os.mkfifo(full, o.mode)
        if o.kind != "l":
            os.chmod(full, o.mode)
        for name, value in o.xattrs.items():
            os.setxattr(full, name, value.encode())
    for path, _, _ in reversed(spec):
        os.utime(os.path.join(root, path), ns=(LOWER_MTIME_NS, LOWER_MTIME_NS),
                 follow_symlinks=False)


def initial_model(spec):
    m = Model()
    for path, fid, o in spec:
        m.add(path, fid, o.copy())
    return m
