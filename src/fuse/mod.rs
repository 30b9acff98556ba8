//! The FUSE adapter: `fuser::Filesystem` requests turned into [`Overlay`] calls, and core
//! errors into errnos in exactly one place ([`OverlayFs::fail`]).

pub mod busy_poll;
mod killpriv;
pub mod passthrough;
mod readdirplus;
mod reader_cpus;
pub mod session;
mod splice_read;

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType as FuseFileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use rustix::fs::{FileType, Stat};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::fuse::busy_poll::BusyPoll;
use crate::fuse::killpriv::KillRequest;
use crate::fuse::passthrough::{OpenMode, Passthrough, RealOpen};
use crate::ovl::dir::{Caller, NewObject};
use crate::ovl::file::wants_write;
use crate::ovl::fileattr::FileAttrForm;
use crate::ovl::idmap::IdMap;
use crate::ovl::inode::{Ino, Node};
use crate::ovl::layer::LayerIdx;
use crate::ovl::setattr::SetAttr;
use crate::ovl::{Entry, Overlay};
use crate::sys::fs::TimeSpec;

/// The mounted filesystem as fuser sees it.
pub struct OverlayFs {
    ovl: Arc<Overlay>,
    ttl: Duration,
    passthrough: Passthrough,
    /// Set once the session exists and busy polling is on (see [`BusyPoll`]).
    busy_poll: Arc<OnceLock<Arc<BusyPoll>>>,
    /// Which callers get attributes in READDIRPLUS (see [`readdirplus`]).
    listing_callers: readdirplus::ListingCallers,
}

impl OverlayFs {
    /// Wraps a prepared union.
    pub fn new(ovl: Arc<Overlay>) -> OverlayFs {
        let ttl = ovl.cfg.timeout;
        let passthrough = Passthrough::new(ovl.cfg.passthrough && ovl.cfg.fsync);
        OverlayFs {
            ovl,
            ttl,
            passthrough,
            busy_poll: Arc::default(),
            listing_callers: readdirplus::ListingCallers::new(),
        }
    }

    /// Where the session puts its [`BusyPoll`] once it has an fd to poll.
    pub fn busy_poll_slot(&self) -> Arc<OnceLock<Arc<BusyPoll>>> {
        self.busy_poll.clone()
    }

    /// Counts a request for busy polling; every handler of a metadata request calls it
    /// first. Data requests (read, write, fsync, ...) do not count: reads and writes reach
    /// the daemon only where passthrough is off, such requests wait for the disk or move
    /// large buffers more often than not, and polling made rootless random 4 KiB reads 17%
    /// slower.
    fn request(&self, req: &Request) {
        if let Some(poll) = self.busy_poll.get() {
            poll.request(req.pid());
        }
    }

    /// The one place a core error becomes an errno (and a log line).
    fn fail(op: &'static str, err: &Error) -> Errno {
        if err.is_unexpected() {
            warn!(op, error = %err, "request failed");
        } else {
            debug!(op, error = %err, "request failed");
        }
        Errno::from_i32(err.errno())
    }

    /// Open flags that let the kernel keep what it cached (file pages, or with
    /// `FOPEN_CACHE_DIR` a directory listing) across opens. The layers change only through us,
    /// and the kernel drops a cached listing itself when the directory changes through the
    /// mount, so this is safe unless caching is turned off (`timeout=0`).
    fn cache_flags(&self, extra: FopenFlags) -> FopenFlags {
        // Passthrough writes bypass the page cache of our inodes: a cached open must not
        // keep pages from before them.
        let files_bypass =
            self.passthrough.enabled() && !extra.contains(FopenFlags::FOPEN_CACHE_DIR);
        match self.ttl.is_zero() || files_bypass {
            true => FopenFlags::empty(),
            false => extra | FopenFlags::FOPEN_KEEP_CACHE,
        }
    }

    /// Open flags of a file handle that does its I/O through us (not passthrough). A
    /// write-only handle skips our inodes' page cache (`FOPEN_DIRECT_IO`): the data is cached
    /// once, by the upper filesystem, instead of twice, and the writer's pages go to us
    /// without being copied into cache pages first (a rootless `dd` of 1 GiB: 3.4 s -> see
    /// the benchmarks). Nothing can map such a handle (mmap needs read access), and the
    /// kernel drops cached pages of the range a direct write covers, so other handles stay
    /// coherent (`FUSE_DIRECT_IO_ALLOW_MMAP` makes it also flush them first).
    fn cached_open_flags(&self, open_flags: i32) -> FopenFlags {
        if open_flags & libc::O_ACCMODE == libc::O_WRONLY {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            self.cache_flags(FopenFlags::empty())
        }
    }

    /// How the new handle `fh` of `ino`, opened with `open(2)` `flags`, does its I/O (see
    /// [`Passthrough`]); `register` is the reply's `open_backing`.
    fn io_mode(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Result<OpenMode, Error> {
        let (fd, layer) = self.ovl.handle_real(fh)?;
        let real = RealOpen {
            fd: fd.as_fd(),
            lower: layer != LayerIdx::UPPER,
            write: wants_write(flags),
        };
        let mode = self.passthrough.open(ino, fh, real, register);
        if matches!(mode, OpenMode::Busy) {
            self.ovl.release(fh);
        }
        Ok(mode)
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Error> {
        self.ovl.node(Ino(ino.0))
    }

    fn entry_reply(&self, reply: ReplyEntry, res: Result<Entry, Error>, op: &'static str) {
        match res {
            Ok(e) => reply.entry(
                &self.ttl,
                &file_attr(&e.stat, &self.ovl.cfg.ids),
                Generation(e.node.generation),
            ),
            Err(e) => reply.error(Self::fail(op, &e)),
        }
    }
}

/// Converts an overlay `Stat` into fuser's attribute record, with the owner as the mount
/// shows it (`ids`).
fn file_attr(st: &Stat, ids: &IdMap) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec as i64),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: fuse_file_type(FileType::from_raw_mode(st.st_mode)),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: ids.uids.shown(st.st_uid),
        gid: ids.gids.shown(st.st_gid),
        // FUSE carries the kernel's 32-bit "new" device encoding, which matches the low 32
        // bits of glibc's for every major/minor that fits.
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn fuse_file_type(t: FileType) -> FuseFileType {
    match t {
        FileType::Directory => FuseFileType::Directory,
        FileType::Symlink => FuseFileType::Symlink,
        FileType::Fifo => FuseFileType::NamedPipe,
        FileType::Socket => FuseFileType::Socket,
        FileType::CharacterDevice => FuseFileType::CharDevice,
        FileType::BlockDevice => FuseFileType::BlockDevice,
        _ => FuseFileType::RegularFile,
    }
}

impl Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each capability separately: an old kernel lacking one must not cost us the rest.
        for cap in [
            // READDIRPLUS for every batch, without FUSE_READDIRPLUS_AUTO: which entries
            // carry attributes is decided per caller (see `readdirplus`).
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            // No getxattr(security.capability) before every write; set-id bits are then ours
            // to remove (see `killpriv`).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // Direct writes (write-only handles) flush and drop the range's cached pages on
            // every kernel version, not only where that is unconditional.
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // The kernel checks POSIX ACLs itself (as overlayfs does with the real files') and
        // caches them: no getxattr(system.posix_acl_access) round trip per `ls -l`. It then
        // leaves the umask to us, which applies it only where no default ACL does instead.
        if self.ovl.cfg.acl
            && (config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_err()
                || config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_err())
        {
            warn!("the kernel has no FUSE POSIX ACL support: ACLs are not enforced");
        }
        let _ = config.set_max_readahead(1 << 20);
        // Passthrough needs the capability and a stacking depth: our backing files sit on a
        // plain filesystem (depth 0), so we are depth 1 and may still be an overlay's lower.
        if self.passthrough.enabled()
            && (config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err())
        {
            info!("the kernel has no FUSE passthrough: reads and writes go through the daemon");
            self.passthrough.disable();
        }
        Ok(())
    }

    fn destroy(&mut self) {
        // Called once every request loop has ended: the kernel has let go of the mount.
        // Returning would let fuser 0.18 unmount the mountpoint path once more (it takes the
        // dead connection for a live mount), taking down whatever was mounted on that path
        // since: a container restarted on the same directory. Leave before it can.
        info!(nodes = self.ovl.inodes.len(), "unmounted");
        std::process::exit(0);
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.request(req);
        debug!(op = "lookup", parent = parent.0, ?name);
        self.listing_callers.looked_up(req.pid(), parent.0);
        let res = self.node(parent).and_then(|p| self.ovl.lookup(&p, name));
        self.entry_reply(reply, res, "lookup");
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        self.request(req);
        self.ovl.forget(Ino(ino.0), nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.request(req);
        debug!(op = "getattr", ino = ino.0);
        match self.node(ino).and_then(|n| self.ovl.getattr(&n)) {
            Ok(st) => reply.attr(&self.ttl, &file_attr(&st, &self.ovl.cfg.ids)),
            Err(e) => reply.error(Self::fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.request(req);
        debug!(op = "setattr", ino = ino.0, ?mode, ?uid, ?gid, ?size);
        if size.is_some() && self.passthrough.data_pinned(ino.0) {
            // Readers see the lower file through passthrough: it must not change under them.
            return reply.error(Errno::ETXTBSY);
        }
        let ids = &self.ovl.cfg.ids;
        let kill = KillRequest::of(
            mode.is_some(),
            uid.is_some() || gid.is_some(),
            size.is_some(),
            atime.is_some() || mtime.is_some(),
        );
        let mode = match mode {
            Some(m) => Some(m),
            None => match self.killed_mode(req, ino, kill) {
                Ok(m) => m,
                Err(e) => return reply.error(e),
            },
        };
        let attr = SetAttr {
            mode,
            uid: uid.map(|u| ids.uids.disk(u)),
            gid: gid.map(|g| ids.gids.disk(g)),
            size,
            atime: atime.map(time_spec),
            mtime: mtime.map(time_spec),
        };
        match self
            .node(ino)
            .and_then(|n| self.ovl.setattr(&n, attr, fh.map(|f| f.0)))
        {
            Ok(st) => reply.attr(&self.ttl, &file_attr(&st, &self.ovl.cfg.ids)),
            Err(e) => reply.error(Self::fail("setattr", &e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.request(req);
        debug!(op = "readlink", ino = ino.0);
        match self.node(ino).and_then(|n| self.ovl.readlink(&n)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(Self::fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.request(req);
        debug!(op = "mknod", parent = parent.0, ?name, mode);
        let res = self.node(parent).and_then(|p| {
            self.ovl
                .create_object(
                    &p,
                    name,
                    mode,
                    NewObject::Node(u64::from(rdev)),
                    caller(req, umask, &self.ovl.cfg.ids),
                )
                .map(|(e, _)| e)
        });
        self.entry_reply(reply, res, "mknod");
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.request(req);
        debug!(op = "mkdir", parent = parent.0, ?name, mode);
        let res = self.node(parent).and_then(|p| {
            self.ovl
                .create_object(
                    &p,
                    name,
                    libc::S_IFDIR | (mode & 0o7777),
                    NewObject::Dir,
                    caller(req, umask, &self.ovl.cfg.ids),
                )
                .map(|(e, _)| e)
        });
        self.entry_reply(reply, res, "mkdir");
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.request(req);
        debug!(op = "unlink", parent = parent.0, ?name);
        match self.node(parent).and_then(|p| self.ovl.unlink(&p, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("unlink", &e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.request(req);
        debug!(op = "rmdir", parent = parent.0, ?name);
        match self.node(parent).and_then(|p| self.ovl.rmdir(&p, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("rmdir", &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.request(req);
        debug!(op = "symlink", parent = parent.0, ?link_name, ?target);
        let res = self.node(parent).and_then(|p| {
            self.ovl
                .create_object(
                    &p,
                    link_name,
                    libc::S_IFLNK | 0o777,
                    NewObject::Symlink(target.as_os_str()),
                    caller(req, 0, &self.ovl.cfg.ids),
                )
                .map(|(e, _)| e)
        });
        self.entry_reply(reply, res, "symlink");
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.request(req);
        debug!(
            op = "rename",
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname
        );
        let res = self.node(parent).and_then(|p| {
            let np = self.node(newparent)?;
            self.ovl.rename(&p, name, &np, newname, flags.bits())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("rename", &e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.request(req);
        debug!(op = "link", ino = ino.0, newparent = newparent.0, ?newname);
        let res = self.node(ino).and_then(|n| {
            let np = self.node(newparent)?;
            self.ovl.link(&n, &np, newname)
        });
        self.entry_reply(reply, res, "link");
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.request(req);
        debug!(op = "open", ino = ino.0, flags = flags.0);
        let res = self.node(ino).and_then(|n| {
            let fh = self.ovl.open(&n, flags.0)?;
            let mode = self.io_mode(ino.0, fh, flags.0, |fd| reply.open_backing(fd))?;
            Ok((fh, mode))
        });
        match res {
            Ok((fh, OpenMode::Passthrough(id))) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
            }
            Ok((fh, OpenMode::Cached)) => {
                reply.opened(FileHandle(fh), self.cached_open_flags(flags.0))
            }
            Ok((_, OpenMode::Busy)) => reply.error(Errno::ETXTBSY),
            Err(e) => reply.error(Self::fail("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Spliced from the real file where it can be (one copy of each byte, not two), else
        // sent from inside `read_with`: the data stays in the reader's own buffer.
        let reply = match self.ovl.handle_fd(fh.0) {
            Ok(fd) => match splice_read::reply_spliced(fd.as_fd(), offset, size as usize, reply) {
                Ok(()) => return,
                Err(reply) => reply,
            },
            Err(e) => return reply.error(Self::fail("read", &e)),
        };
        self.ovl.read_with(fh.0, offset, size, |data| match data {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(Self::fail("read", &e)),
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.kill_on_write(req, ino) {
                return reply.error(Self::fail("write", &e));
            }
        }
        match self.ovl.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Self::fail("write", &e)),
        }
    }

    /// Nothing to do on close: data goes straight to the real file and locks are the kernel's.
    /// ENOSYS tells the kernel so once, and it stops sending a FLUSH on every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.request(req);
        self.passthrough.release(fh.0);
        self.ovl.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.ovl.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("fsync", &e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.request(req);
        debug!(op = "opendir", ino = ino.0);
        // ENOSYS: the kernel stops sending OPENDIR and RELEASEDIR (two round trips per
        // directory walked) and caches every listing (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
        // dropping it itself when the directory changes through the mount. Reads name their
        // listing by offset instead of handle (see `Listings`). Only `timeout=0` asks for
        // listings not to be cached, which needs an open reply without those flags.
        match self.ttl.is_zero() {
            true => reply.opened(FileHandle(0), FopenFlags::empty()),
            false => reply.error(Errno::ENOSYS),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.request(req);
        debug!(op = "readdir", ino = ino.0, offset);
        match self.node(ino).and_then(|d| self.ovl.readdir(&d, offset)) {
            Ok(listing) => {
                for (i, e) in listing.entries.iter_from(listing.start) {
                    let kind = fuse_file_type(e.file_type);
                    if reply.add(INodeNo(e.ino.0), listing.offset_after(i), kind, e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(Self::fail("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.request(req);
        debug!(op = "readdirplus", ino = ino.0, offset);
        let (dir, listing) = match self
            .node(ino)
            .and_then(|d| self.ovl.readdir(&d, offset).map(|l| (d, l)))
        {
            Ok(v) => v,
            Err(e) => return reply.error(Self::fail("readdirplus", &e)),
        };
        self.reply_readdirplus(req.pid(), &dir, &listing, reply);
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.request(req);
        match self.node(ino).and_then(|n| self.ovl.fsyncdir(&n, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("fsyncdir", &e)),
        }
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.request(req);
        match self.ovl.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::ovl::namei::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Self::fail("statfs", &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.request(req);
        debug!(op = "setxattr", ino = ino.0, ?name);
        match self
            .node(ino)
            .and_then(|n| self.ovl.setxattr(&n, name, value, flags))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("setxattr", &e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.request(req);
        debug!(op = "getxattr", ino = ino.0, ?name);
        match self.node(ino).and_then(|n| self.ovl.getxattr(&n, name)) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(Self::fail("getxattr", &e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.request(req);
        debug!(op = "listxattr", ino = ino.0);
        match self.node(ino).and_then(|n| self.ovl.listxattr(&n)) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(Self::fail("listxattr", &e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.request(req);
        debug!(op = "removexattr", ino = ino.0, ?name);
        match self.node(ino).and_then(|n| self.ovl.removexattr(&n, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("removexattr", &e)),
        }
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.request(req);
        debug!(op = "ioctl", ino = ino.0, cmd);
        // The kernel sends only what `lsattr`/`chattr` ask (fileattr); any other ioctl on an
        // overlay file is ENOTTY, as on kernel overlayfs.
        let Some(form) = FileAttrForm::of_ioctl(cmd) else {
            return reply.error(Errno::ENOTTY);
        };
        match self.node(ino).and_then(|n| self.ovl.fileattr_get(&n, form)) {
            Ok(bytes) if bytes.len() <= out_size as usize => reply.ioctl(0, &bytes),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(Self::fail("ioctl", &e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.request(req);
        // Only reached without default_permissions; the kernel checks mode bits otherwise.
        let res = self.node(ino).and_then(|_| {
            if mask.contains(AccessFlags::W_OK) {
                self.ovl.want_write()
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("access", &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.request(req);
        debug!(op = "create", parent = parent.0, ?name, mode, flags);
        let res = self.node(parent).and_then(|p| {
            let oflags = create_access(flags);
            let (entry, fd) = self.ovl.create_object(
                &p,
                name,
                libc::S_IFREG | (mode & 0o7777),
                NewObject::File(oflags),
                caller(req, umask, &self.ovl.cfg.ids),
            )?;
            let fd = fd.ok_or(Error::Internal("create returned no descriptor"))?;
            let fh = self
                .ovl
                .add_handle(&entry.node, fd, LayerIdx::UPPER, oflags);
            Ok((entry, fh))
        });
        let (e, fh) = match res {
            Ok(v) => v,
            Err(e) => return reply.error(Self::fail("create", &e)),
        };
        let (attr, generation) = (
            file_attr(&e.stat, &self.ovl.cfg.ids),
            Generation(e.node.generation),
        );
        let mode = match self.io_mode(e.node.ino.0, fh, flags, |fd| reply.open_backing(fd)) {
            Ok(mode) => mode,
            Err(err) => return reply.error(Self::fail("create", &err)),
        };
        match mode {
            OpenMode::Passthrough(id) => reply.created_passthrough(
                &self.ttl,
                &attr,
                generation,
                FileHandle(fh),
                FopenFlags::empty(),
                &id,
            ),
            // Cannot happen to a new file; refused like any other busy open.
            OpenMode::Busy => reply.error(Errno::ETXTBSY),
            OpenMode::Cached => reply.created(
                &self.ttl,
                &attr,
                generation,
                FileHandle(fh),
                self.cached_open_flags(flags),
            ),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.ovl.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("fallocate", &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        match self.ovl.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(Self::fail("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .ovl
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Self::fail("copy_file_range", &e)),
        }
    }
}

/// The credentials new objects are created with, as the layers store them (`ids`).
fn caller(req: &Request, umask: u32, ids: &IdMap) -> Caller {
    Caller {
        uid: ids.uids.disk(req.uid()),
        gid: ids.gids.disk(req.gid()),
        umask,
    }
}

/// Access mode of a `create` request as open flags for the new upper file.
fn create_access(flags: i32) -> rustix::fs::OFlags {
    let acc = match flags & libc::O_ACCMODE {
        libc::O_WRONLY => rustix::fs::OFlags::WRONLY,
        libc::O_RDWR => rustix::fs::OFlags::RDWR,
        _ => rustix::fs::OFlags::RDONLY,
    };
    acc | rustix::fs::OFlags::from_bits_retain(
        (flags & (libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC)) as u32,
    )
}

/// FUSE time to a `utimensat` time.
fn time_spec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, d.subsec_nanos());
                if ns == 0 {
                    TimeSpec::At(-s, 0)
                } else {
                    TimeSpec::At(-s - 1, 1_000_000_000 - ns)
                }
            }
        },
    }
}

/// Answers a getxattr/listxattr: the size when asked for it, ERANGE when the caller's
/// buffer is too small, the data otherwise.
fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(Error::Range.errno()));
    } else {
        reply.data(value);
    }
}
