//! The union filesystem core. It knows nothing about FUSE: the adapter in [`crate::fuse`]
//! turns requests into calls on [`Overlay`] and [`crate::error::Error`]s into errnos.
//!
//! Split like kernel `fs/overlayfs/`: option parsing ([`params`]), layers ([`layer`]), the
//! inode table ([`inode`]), lookup ([`namei`]), whiteout encodings ([`whiteout`]), merged
//! directory listings ([`readdir`]), open files ([`file`]) and extended attributes
//! ([`xattr`]).

pub mod acl;
pub mod copy_up;
pub mod dir;
pub mod file;
pub mod fileattr;
pub mod idmap;
pub mod index;
pub mod inode;
pub mod layer;
pub mod listing;
pub mod namei;
pub mod names;
pub mod override_stat;
pub mod params;
pub mod readdir;
pub mod rename;
pub mod setattr;
pub mod vfs;
pub mod whiteout;
pub mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rustix::fs::{FileType, Stat};

use crate::error::{Error, Result};
use crate::sys;
use inode::{Ino, InoMap, InodeTable, Node, NodeState, Real};
use layer::{LayerIdx, Layers};
use params::Config;

/// A mounted union: configuration, layers, inode table and open handles.
#[derive(Debug)]
pub struct Overlay {
    /// The validated options.
    pub cfg: Config,
    /// The open layer stack.
    pub layers: Layers,
    /// Nodes the kernel knows.
    pub inodes: InodeTable,
    inomap: InoMap,
    /// `O_PATH` handles on real directories, by (node, layer). Bounded, so a walk of a huge
    /// tree cannot exhaust descriptors; a miss costs one `openat2` from the parent's handle.
    dir_fds: Mutex<LruCache<(Ino, LayerIdx), Arc<OwnedFd>>>,
    files: file::FileTable,
    dirs: readdir::Listings,
    /// Names of lower directories read for listings, so lookups skip layers without the name;
    /// `None` with `timeout=0`, where nothing is cached.
    lower_names: Option<names::LowerNames>,
    upper: Option<UpperCtx>,
    /// Tells the kernel to drop its cached attributes of an inode (set by the FUSE adapter;
    /// the core only knows that such a hook exists).
    invalidate_attrs: InvalidatorSlot,
    /// Upper inode number -> overlay inode number of objects copied up during this mount, so
    /// `st_ino` and `d_ino` stay those of the copy-up origin (kernel: `overlay.origin`).
    origins: Mutex<HashMap<u64, Ino>>,
    /// Lower hard links one of whose names was copied up: the copy keeps the number, the
    /// remaining lower names get this one (two different files never share a number).
    split_links: Mutex<HashMap<(u16, u64), Ino>>,
    /// Upper inode numbers known to carry an origin xattr.
    with_origin: Mutex<std::collections::HashSet<u64>>,
    /// Upper inode numbers whose origin xattr has been looked at (found or not).
    origin_checked: Mutex<std::collections::HashSet<u64>>,
    /// The daemon's effective (uid, gid): the owner of what it creates, unless a set-group-id
    /// directory gives the group.
    own_ids: (u32, u32),
}

/// Callback dropping the kernel's cached attributes of an inode.
pub type AttrInvalidator = Box<dyn Fn(Ino) + Send + Sync>;

/// Holder of the [`AttrInvalidator`], set once by the FUSE adapter; a newtype so that
/// [`Overlay`] stays `Debug`.
#[derive(Default)]
struct InvalidatorSlot(std::sync::OnceLock<AttrInvalidator>);

impl std::fmt::Debug for InvalidatorSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "InvalidatorSlot(set)"
        } else {
            "InvalidatorSlot(unset)"
        })
    }
}

/// What writing to the upper layer needs: the workdir, the xattr namespace we may write, and
/// how whiteouts are encoded.
#[derive(Debug)]
pub struct UpperCtx {
    /// `workdir/work`, where objects are prepared before being renamed into place.
    pub work: Arc<OwnedFd>,
    /// `trusted.overlay.` when we may write trusted xattrs (root in the initial user
    /// namespace), else `user.overlay.` (kernel `userxattr` semantics).
    pub xattr_prefix: &'static str,
    /// Write `.wh.NAME` files instead of 0/0 character devices (mknod refused, or
    /// `FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT` set).
    pub wh_files: AtomicBool,
    /// `workdir/index` with `index=on`.
    pub index: Option<Arc<OwnedFd>>,
    /// Name in the workdir of the whiteout every new whiteout is linked from.
    pub shared_whiteout: Mutex<Option<OsString>>,
    tmp_seq: AtomicU64,
}

impl UpperCtx {
    fn new(work: Arc<OwnedFd>, index: Option<Arc<OwnedFd>>) -> UpperCtx {
        // Probe once, like the kernel's ovl_check_setxattr at mount.
        let probe = OsStr::new("trusted.overlay.stratafs-probe");
        let trusted = sys::fs::set_xattr(work.as_fd(), probe, b"y", 0).is_ok();
        if trusted {
            let _ = sys::fs::remove_xattr(work.as_fd(), probe);
        }
        UpperCtx {
            work,
            index,
            xattr_prefix: if trusted {
                "trusted.overlay."
            } else {
                "user.overlay."
            },
            wh_files: AtomicBool::new(
                std::env::var_os("FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT").is_some(),
            ),
            tmp_seq: AtomicU64::new(0),
            shared_whiteout: Mutex::new(None),
        }
    }

    /// Whether origins are recorded as file handles. Without privilege over the initial user
    /// namespace (rootless: no `trusted.*` xattrs either) the kernel cannot decode handles and
    /// writes an empty `overlay.origin` ("copied up, from somewhere"); so do we, to match.
    pub fn origin_handles(&self) -> bool {
        self.xattr_prefix == "trusted.overlay."
    }

    /// The `overlay.origin` value to record for lower object `obj` on a filesystem with
    /// `uuid`: its file handle, or the empty value when handles are not used.
    pub fn origin_value(&self, obj: BorrowedFd<'_>, uuid: &[u8; 16]) -> Option<Vec<u8>> {
        match self.origin_handles() {
            true => whiteout::encode_origin(obj, uuid),
            false => Some(Vec::new()),
        }
    }

    /// A fresh name for a temporary in the workdir (`#N`, as the kernel names them).
    pub fn tmp_name(&self) -> OsString {
        format!("#{:x}", self.tmp_seq.fetch_add(1, Ordering::Relaxed)).into()
    }

    /// The name of the opaque-directory xattr we write.
    pub fn opaque_xattr(&self) -> OsString {
        self.xattr("opaque")
    }

    /// `<prefix>overlay.<what>` in the namespace this mount writes.
    pub fn xattr(&self, what: &str) -> OsString {
        format!("{}{what}", self.xattr_prefix).into()
    }

    /// Gives a new upper layer a persistent overlay UUID, as the kernel does on the first
    /// mount of a new overlay (`uuid=auto`: only while the upper root is not yet impure).
    fn init_uuid(&self, upper_root: std::os::fd::BorrowedFd<'_>) {
        let name = self.xattr("uuid");
        if matches!(sys::fs::get_xattr(upper_root, &name), Ok(Some(_))) {
            return;
        }
        if matches!(
            sys::fs::get_xattr(upper_root, &self.xattr("impure")),
            Ok(Some(_))
        ) {
            return;
        }
        let _ = vfs::do_setxattr(upper_root, &name, &sys::fs::random_uuid(), 0);
    }
}

/// A looked-up object: its node (with one kernel reference counted) and the attributes to
/// show.
#[derive(Debug)]
pub struct Entry {
    /// The node.
    pub node: Arc<Node>,
    /// Attributes as the merged view shows them.
    pub stat: Stat,
}

impl Overlay {
    /// Builds the union over already opened `layers`. `fd_budget` bounds the directory handle
    /// cache.
    pub fn new(cfg: Config, layers: Layers, fd_budget: usize) -> Result<Overlay> {
        let inomap = InoMap::new(layers.fs_count);
        let mut reals = Vec::new();
        for layer in layers.stack() {
            let markers = whiteout::dir_markers(layer.root.as_fd())
                .map_err(|e| Error::io("read markers of a layer root", e))?;
            reals.push(Real {
                layer: layer.idx,
                xwhiteouts: markers.xwhiteouts,
                impure: markers.impure,
                loc: inode::Loc::Same,
            });
        }
        let root = Arc::new(Node::new(
            Ino::ROOT,
            FileType::Directory,
            NodeState::new(None, OsString::new(), reals),
        ));
        let inodes = InodeTable::default();
        inodes.set_root(root);
        let cap = NonZeroUsize::new(fd_budget.max(64)).unwrap_or(NonZeroUsize::MIN);
        let lower_names = (!cfg.timeout.is_zero()).then(names::LowerNames::default);
        let upper = match (&layers.work, cfg.is_read_only()) {
            (Some(work), false) => {
                let work = work.try_clone().map_err(|e| Error::io("dup workdir", e))?;
                let index = match &layers.index {
                    Some(fd) => Some(Arc::new(
                        fd.try_clone().map_err(|e| Error::io("dup index dir", e))?,
                    )),
                    None => None,
                };
                let ctx = UpperCtx::new(Arc::new(work), index);
                if let Some(upper) = layers.upper() {
                    ctx.init_uuid(upper.root.as_fd());
                }
                Some(ctx)
            }
            _ => None,
        };
        let ovl = Overlay {
            cfg,
            layers,
            inodes,
            inomap,
            dir_fds: Mutex::new(LruCache::new(cap)),
            files: file::FileTable::default(),
            dirs: readdir::Listings::default(),
            lower_names,
            upper,
            invalidate_attrs: InvalidatorSlot::default(),
            origins: Mutex::new(HashMap::new()),
            origin_checked: Mutex::new(std::collections::HashSet::new()),
            split_links: Mutex::new(HashMap::new()),
            with_origin: Mutex::new(std::collections::HashSet::new()),
            own_ids: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
        };
        ovl.init_index()?;
        Ok(ovl)
    }

    /// The owner an object created by the daemon in a directory with attributes `parent`
    /// gets from the kernel (inode_init_owner).
    pub(crate) fn created_owner(&self, parent: &Stat) -> (u32, u32) {
        let gid = match parent.st_mode & libc::S_ISGID != 0 {
            true => parent.st_gid,
            false => self.own_ids.1,
        };
        (self.own_ids.0, gid)
    }

    /// Whether the lower layers may still be changed between mounts (kernel
    /// `ovl_allow_offline_changes`: none of index, metacopy, redirect_dir=on is in use). The
    /// kernel then skips optimisations that assume they do not, and so do we.
    pub fn allows_offline_changes(&self) -> bool {
        let index = self.cfg.index && self.upper_ctx().is_ok_and(|u| u.origin_handles());
        !index && !self.cfg.metacopy && self.cfg.redirect_dir != params::RedirectDir::On
    }

    /// Installs the hook that drops the kernel's cached attributes (once, at mount).
    pub fn set_attr_invalidator(&self, f: AttrInvalidator) {
        let _ = self.invalidate_attrs.0.set(f);
    }

    /// Asks the kernel to fetch `ino`'s attributes again (they changed behind its back, e.g.
    /// the link count of a hard link that was copied up).
    pub fn invalidate_attrs(&self, ino: Ino) {
        if let Some(f) = self.invalidate_attrs.0.get() {
            f(ino);
        }
    }

    /// The node for an inode number from a request.
    pub fn node(&self, ino: Ino) -> Result<Arc<Node>> {
        self.inodes.get(ino)
    }

    /// Drops `n` kernel references to `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// Current attributes of `node`.
    pub fn getattr(&self, node: &Node) -> Result<Stat> {
        let st = self.real_getattr(node)?;
        let st = match node.state().indexed && !node.is_dir() {
            true => self.with_indexed_nlink(node, st)?,
            false => st,
        };
        let st = self.with_override(node, st);
        Ok(inode::overlay_stat(node, st, self.cfg.static_nlink))
    }

    /// An indexed hard link shows the link count its `overlay.nlink` keeps.
    fn with_indexed_nlink(&self, node: &Node, mut st: Stat) -> Result<Stat> {
        let obj = self.real_path_fd(node)?;
        let lower_nlink = match node.state().reals.iter().find(|r| !r.layer.is_upper()) {
            Some(r) => {
                let (dir, name) = self.real_parent(node, r.layer)?;
                sys::fs::stat_name(dir.as_fd(), &name).map_or(st.st_nlink, |l| l.st_nlink)
            }
            None => st.st_nlink,
        };
        st.st_nlink = self.indexed_nlink(obj.as_fd(), st.st_nlink, lower_nlink)?;
        Ok(st)
    }

    /// Attributes of the real object behind `node` (before the merged view's adjustments).
    fn real_getattr(&self, node: &Node) -> Result<Stat> {
        let detached = {
            let st = node.state();
            st.detached.clone().or_else(|| st.index_copy.clone())
        };
        if let Some(fd) = detached {
            return sys::fs::stat_fd(fd.as_fd()).map_err(|e| Error::io("stat", e));
        }
        let top = node.top()?;
        let mut st = if node.is_dir() {
            let fd = self.real_dir_fd(node, top.layer)?;
            sys::fs::stat_fd(fd.as_fd()).map_err(|e| Error::io("stat directory", e))?
        } else {
            let (parent, name) = self.real_parent(node, top.layer)?;
            sys::fs::stat_name(parent.as_fd(), &name).map_err(|e| Error::io("stat", e))?
        };
        if node.state().metacopy {
            // The blocks are the lower data's (kernel ovl_getattr).
            let data = node.data_real()?;
            let (dir, name) = self.real_parent(node, data.layer)?;
            if let Ok(dst) = sys::fs::stat_name(dir.as_fd(), &name) {
                st.st_blocks = dst.st_blocks;
            }
        }
        Ok(st)
    }

    /// Target of the symlink `node`.
    pub fn readlink(&self, node: &Node) -> Result<Vec<u8>> {
        if node.file_type != FileType::Symlink {
            return Err(Error::io(
                "readlink",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let top = node.top()?;
        let (parent, name) = self.real_parent(node, top.layer)?;
        sys::fs::read_link(parent.as_fd(), &name).map_err(|e| Error::io("readlink", e))
    }

    /// Filesystem statistics: the upper layer's, else the top lower's (kernel `ovl_statfs`).
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        let layer = self
            .layers
            .statfs_layer()
            .ok_or(Error::Internal("no layers"))?;
        sys::fs::statvfs(layer.root.as_fd()).map_err(|e| Error::io("statfs", e))
    }

    /// Fails with EROFS unless the mount can be written to. Every request that would change
    /// the merged view goes through here first.
    pub fn want_write(&self) -> Result<()> {
        self.upper_ctx().map(|_| ())
    }

    /// The upper-layer context, or EROFS on a read-only mount.
    pub fn upper_ctx(&self) -> Result<&UpperCtx> {
        self.upper.as_ref().ok_or(Error::ReadOnly)
    }

    /// The overlay inode number of real inode `real_ino` found in `layer`: the copy-up
    /// origin's number for objects copied up during this mount, else the xino mapping.
    pub fn ino_for(&self, layer: LayerIdx, real_ino: u64) -> Ino {
        if layer.is_upper() {
            if let Some(ino) = self
                .origins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&real_ino)
            {
                return *ino;
            }
        }
        let fsid = self.layers.get(layer).map_or(0, |l| l.fsid);
        if !layer.is_upper() {
            let split = self.split_links.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ino) = split.get(&(fsid, real_ino)) {
                return *ino;
            }
        }
        self.inomap.map(fsid, real_ino)
    }

    /// The number real object `real_ino` of `layer` shows when nothing (no copy-up origin, no
    /// broken hard link) makes it show another.
    pub fn own_ino(&self, layer: LayerIdx, real_ino: u64) -> Ino {
        let fsid = self.layers.get(layer).map_or(0, |l| l.fsid);
        self.inomap.map(fsid, real_ino)
    }

    /// A name of the lower hard link `real_ino` in `layer` was copied up: from now on its
    /// other (lower) names show a number of their own.
    pub fn split_link(&self, layer: LayerIdx, real_ino: u64) {
        let fsid = self.layers.get(layer).map_or(0, |l| l.fsid);
        let mut split = self.split_links.lock().unwrap_or_else(|e| e.into_inner());
        split
            .entry((fsid, real_ino))
            .or_insert_with(|| self.inomap.alloc());
    }

    /// Remembers that upper inode `upper_ino` keeps showing as `ino`.
    pub fn record_origin(&self, upper_ino: u64, ino: Ino) {
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upper_ino, ino);
    }

    /// Forgets the origin of upper inode `upper_ino` (the object is gone).
    pub fn forget_origin(&self, upper_ino: u64) {
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&upper_ino);
        self.origin_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&upper_ino);
    }

    /// Whether the origin of upper inode `upper_ino` is known (or known to be absent).
    pub fn origin_known(&self, upper_ino: u64) -> bool {
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&upper_ino)
            || self
                .origin_checked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&upper_ino)
    }

    /// Whether upper inode `upper_ino` is known to carry an origin xattr.
    pub fn upper_has_origin(&self, upper_ino: u64) -> bool {
        self.with_origin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&upper_ino)
    }

    /// Remembers that upper inode `upper_ino` carries an origin xattr.
    pub fn mark_has_origin(&self, upper_ino: u64) {
        self.with_origin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upper_ino);
    }

    /// Remembers that upper inode `upper_ino` has been checked for an origin.
    pub fn mark_origin_checked(&self, upper_ino: u64) {
        self.origin_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upper_ino);
    }

    /// Drops cached directory handles of `ino` (the directory was removed: its number may be
    /// reused).
    pub fn forget_dir_fds(&self, ino: Ino, reals: &[Real]) {
        let mut cache = self.dir_fds.lock().unwrap_or_else(|e| e.into_inner());
        for r in reals {
            cache.pop(&(ino, r.layer));
        }
        cache.pop(&(ino, LayerIdx::UPPER));
    }

    /// `O_PATH` handle on the real directory of `node` in `layer`, from the cache or opened
    /// from the nearest ancestor that has one (iteratively, so deep trees cost no recursion).
    /// Redirected directories are opened by their path from the layer root.
    pub fn real_dir_fd(&self, node: &Node, layer: LayerIdx) -> Result<Arc<OwnedFd>> {
        if node.ino == Ino::ROOT {
            return self.layer_root(layer);
        }
        if let Some(fd) = self.cached_dir_fd(node.ino, layer) {
            return Ok(fd);
        }
        // Walk up, remembering the names to open on the way back down.
        let mut chain: Vec<(Ino, OsString)> = Vec::new();
        let step = |n: &Node,
                    chain: &mut Vec<(Ino, OsString)>|
         -> Result<Result<Arc<OwnedFd>, Arc<Node>>> {
            let (parent, name) = n.parent_and_name();
            match n.loc_in(layer) {
                inode::Loc::Abs(path) => {
                    let root = self.layer_root(layer)?;
                    let fd = sys::fs::open_dir_path(root.as_fd(), path.as_os_str())
                        .map_err(|e| Error::io("open redirected directory", e))?;
                    let fd = Arc::new(fd);
                    self.cache_dir_fd(n.ino, layer, fd.clone());
                    return Ok(Ok(fd));
                }
                inode::Loc::Renamed(real_name) => chain.push((n.ino, real_name)),
                inode::Loc::Same => chain.push((n.ino, name)),
            }
            let p = parent.ok_or(Error::Internal("non-root node without parent"))?;
            if p.ino == Ino::ROOT {
                return Ok(Ok(self.layer_root(layer)?));
            }
            if let Some(fd) = self.cached_dir_fd(p.ino, layer) {
                return Ok(Ok(fd));
            }
            Ok(Err(p))
        };
        let mut next = step(node, &mut chain)?;
        let mut fd = loop {
            match next {
                Ok(fd) => break fd,
                Err(p) => next = step(&p, &mut chain)?,
            }
        };
        while let Some((ino, name)) = chain.pop() {
            let child = sys::fs::open_dir_path(fd.as_fd(), &name)
                .map_err(|e| Error::io("open real directory", e))?;
            fd = Arc::new(child);
            self.cache_dir_fd(ino, layer, fd.clone());
        }
        Ok(fd)
    }

    /// The path of `node`'s real object in `layer`, from the layer root (for redirects).
    pub fn real_path(&self, node: &Node, layer: LayerIdx) -> std::path::PathBuf {
        let mut parts: Vec<OsString> = Vec::new();
        let mut base = std::path::PathBuf::new();
        let mut next = self.real_path_step(node, layer, &mut parts, &mut base);
        while let Some(p) = next {
            next = self.real_path_step(&p, layer, &mut parts, &mut base);
        }
        for part in parts.iter().rev() {
            base.push(part);
        }
        base
    }

    /// One step of [`Self::real_path`]: records `n`'s name, returns the parent to continue with.
    fn real_path_step(
        &self,
        n: &Node,
        layer: LayerIdx,
        parts: &mut Vec<OsString>,
        base: &mut std::path::PathBuf,
    ) -> Option<Arc<Node>> {
        if n.ino == Ino::ROOT {
            return None;
        }
        let (parent, name) = n.parent_and_name();
        match n.loc_in(layer) {
            inode::Loc::Abs(p) => {
                *base = p;
                return None;
            }
            inode::Loc::Renamed(x) => parts.push(x),
            inode::Loc::Same => parts.push(name),
        }
        parent
    }

    /// The real parent directory and name of a non-directory `node` in `layer`.
    pub fn real_parent(&self, node: &Node, layer: LayerIdx) -> Result<(Arc<OwnedFd>, OsString)> {
        let (parent, name) = node.parent_and_name();
        let parent = parent.ok_or(Error::Internal("non-root node without parent"))?;
        match node.loc_in(layer) {
            inode::Loc::Same => Ok((self.real_dir_fd(&parent, layer)?, name)),
            inode::Loc::Renamed(real_name) => Ok((self.real_dir_fd(&parent, layer)?, real_name)),
            inode::Loc::Abs(path) => {
                let leaf = path
                    .file_name()
                    .ok_or(Error::Internal("redirect without a name"))?
                    .to_owned();
                let root = self.layer_root(layer)?;
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => Arc::new(
                        sys::fs::open_dir_path(root.as_fd(), d.as_os_str())
                            .map_err(|e| Error::io("open redirected parent", e))?,
                    ),
                    _ => root,
                };
                Ok((dir, leaf))
            }
        }
    }

    /// The directory and name of the top real object of `node`, for calls that take both;
    /// `None` for directories (their own fd is at hand) and for objects reached through an
    /// fd only (unlinked while open, indexed copies).
    pub(crate) fn real_entry(&self, node: &Node) -> Result<Option<(Arc<OwnedFd>, OsString)>> {
        let top = node.top()?;
        let by_fd = node.is_dir() || {
            let st = node.state();
            st.detached.is_some() || st.index_copy.is_some()
        };
        if by_fd {
            return Ok(None);
        }
        self.real_parent(node, top.layer).map(Some)
    }

    /// `O_PATH` handle on the top real object of `node`, whatever its type.
    pub fn real_path_fd(&self, node: &Node) -> Result<Arc<OwnedFd>> {
        let top = node.top()?;
        if node.is_dir() {
            return self.real_dir_fd(node, top.layer);
        }
        let detached = {
            let st = node.state();
            st.detached.clone().or_else(|| st.index_copy.clone())
        };
        if let Some(fd) = detached {
            return Ok(fd);
        }
        let (parent, name) = self.real_parent(node, top.layer)?;
        let fd = sys::fs::open_path(parent.as_fd(), &name).map_err(|e| Error::io("open", e))?;
        Ok(Arc::new(fd))
    }

    fn layer_root(&self, layer: LayerIdx) -> Result<Arc<OwnedFd>> {
        let root = self
            .layers
            .get(layer)
            .ok_or(Error::Internal("unknown layer index"))?;
        Ok(root.root.clone())
    }

    pub(crate) fn cached_dir_fd(&self, ino: Ino, layer: LayerIdx) -> Option<Arc<OwnedFd>> {
        self.dir_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(ino, layer))
            .cloned()
    }

    fn cache_dir_fd(&self, ino: Ino, layer: LayerIdx, fd: Arc<OwnedFd>) {
        self.dir_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put((ino, layer), fd);
    }
}
