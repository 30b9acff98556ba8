//! Copy-up through the workdir (kernel `fs/overlayfs/copy_up.c`).
//!
//! A lower object is rebuilt as a temporary in `workdir/work`: data first (reflink, then
//! `copy_file_range` over data extents, then a buffer copy; holes stay holes), then xattrs,
//! owner, mode and times, and only then renamed into the upper layer. A killed daemon leaves
//! either no upper copy or a complete one; a [`TempGuard`] removes the temporary on error and
//! the next mount empties the workdir. Parents are copied up first, with their own metadata.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{FileType, OFlags, Stat};
use tracing::debug;

use crate::error::{Error, Result};
use crate::ovl::inode::{Node, Real};
use crate::ovl::layer::LayerIdx;
use crate::ovl::override_stat::{self, OverrideXattr, Owner};
use crate::ovl::{Overlay, fileattr, index, vfs, whiteout};
use crate::sys;
use crate::sys::fs::TimeSpec;

/// `RENAME_NOREPLACE`.
pub const RENAME_NOREPLACE: u32 = 1;
/// `RENAME_EXCHANGE`.
pub const RENAME_EXCHANGE: u32 = 2;
/// `RENAME_WHITEOUT`.
pub const RENAME_WHITEOUT: u32 = 4;

/// Removes a temporary workdir entry unless disarmed (the object was renamed into place).
pub struct TempGuard<'a> {
    dir: BorrowedFd<'a>,
    name: OsString,
    armed: bool,
}

impl<'a> TempGuard<'a> {
    /// Guards `name` in `dir`.
    pub fn new(dir: BorrowedFd<'a>, name: OsString) -> Self {
        TempGuard {
            dir,
            name,
            armed: true,
        }
    }

    /// The guarded name.
    pub fn name(&self) -> &OsStr {
        &self.name
    }

    /// The object has been moved away: nothing to clean up.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = vfs::do_remove_tree(self.dir, &self.name);
        }
    }
}

impl Overlay {
    /// Makes sure `node` (and so each of its ancestors) has an upper copy (kernel
    /// `ovl_copy_up`). With `metacopy`, a regular file gets a metadata-only copy whose data
    /// stays in the lower layer until [`Self::copy_up_data`].
    pub fn copy_up(&self, node: &Arc<Node>) -> Result<()> {
        self.copy_up_chain(node, self.cfg.metacopy)
    }

    /// Makes sure `node` has an upper copy with its data (open for write, truncate): a full
    /// copy-up, or the completion of a metadata-only one (kernel `ovl_copy_up_meta_inode_data`:
    /// the data is copied into the upper file, then the `metacopy` xattr removed, so a crash in
    /// between leaves a file still reading from below).
    pub fn copy_up_data(&self, node: &Arc<Node>) -> Result<()> {
        self.copy_up_chain(node, false)?;
        if !node.state().metacopy {
            return Ok(());
        }
        let _serial = node.copy_up_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !node.state().metacopy {
            return Ok(());
        }
        let upper = self.upper_ctx()?;
        let data = node.data_real()?;
        let (ldir, lname) = self.real_parent(node, data.layer)?;
        let src = open_lower_file(ldir.as_fd(), &lname)?;
        let size = sys::fs::stat_fd(src.as_fd())
            .map_err(|e| Error::io("copy-up stat", e))?
            .st_size as u64;
        let obj = self.real_path_fd(node)?;
        let dst = sys::fs::reopen(obj.as_fd(), OFlags::WRONLY)
            .map_err(|e| Error::io("copy-up open upper", e))?;
        debug!(target: "stratafs::upper", op = "copy_up_data", name = ?node.parent_and_name().1, size);
        sys::fs::copy_data(src.as_fd(), dst.as_fd(), size, self.copy_durability())
            .map_err(|e| Error::io("copy-up data", e))?;
        match vfs::do_removexattr(obj.as_fd(), &upper.xattr("metacopy")) {
            Ok(()) => {}
            Err(e) if e.errno() == libc::ENODATA => {}
            Err(e) => return Err(e),
        }
        node.state_mut().metacopy = false;
        Ok(())
    }

    /// How copied-up data reaches the disk: synced, as kernel overlayfs does, unless the mount
    /// is `volatile` (`fsync=0`), so a power loss never leaves a renamed-in half file.
    pub(crate) fn copy_durability(&self) -> sys::fs::Durability {
        if self.cfg.fsync {
            sys::fs::Durability::Synced
        } else {
            sys::fs::Durability::Cached
        }
    }

    fn copy_up_chain(&self, node: &Arc<Node>, meta: bool) -> Result<()> {
        if node.is_upper() {
            return Ok(());
        }
        self.want_write()?;
        let mut chain = vec![node.clone()];
        let mut cur = node.state().parent.clone();
        while let Some(p) = cur {
            if p.is_upper() {
                break;
            }
            cur = p.state().parent.clone();
            chain.push(p);
        }
        for n in chain.iter().rev() {
            self.copy_up_one(n, meta)?;
        }
        Ok(())
    }

    /// Copies one object whose parent already has an upper copy.
    fn copy_up_one(&self, node: &Arc<Node>, meta: bool) -> Result<()> {
        let _serial = node.copy_up_lock.lock().unwrap_or_else(|e| e.into_inner());
        if node.is_upper() {
            return Ok(());
        }
        let upper = self.upper_ctx()?;
        let top = node.top()?;
        let (parent, _) = node.parent_and_name();
        let parent = parent.ok_or(Error::Internal("copy-up of the root"))?;
        let (lower_dir, lower_name) = self.real_parent(node, top.layer)?;
        let name = node.parent_and_name().1;
        let upper_dir = self.real_dir_fd(&parent, LayerIdx::UPPER)?;
        // A directory is copied from the object it was looked up as (its handle is kept), as
        // the kernel copies from the lower dentry it holds, whatever the name means by now.
        let src_obj = match node.is_dir() {
            true => self.cached_dir_fd(node.ino, top.layer),
            false => None,
        };
        let src_obj = match src_obj {
            Some(fd) => fd,
            None => Arc::new(
                sys::fs::open_path(lower_dir.as_fd(), &lower_name)
                    .map_err(|e| Error::io("copy-up open", e))?,
            ),
        };
        let st = sys::fs::stat_fd(src_obj.as_fd()).map_err(|e| Error::io("copy-up stat", e))?;
        let lower_uuid = self.layers.get(top.layer).map_or([0; 16], |l| l.uuid);
        let file_type = FileType::from_raw_mode(st.st_mode);
        if file_type != node.file_type {
            // The lower layer changed under the mount (a directory replaced by a symlink, say):
            // copying up what is there now would give the name another object, perhaps one
            // leading out of the layers. Kernel overlayfs keeps the old object; we refuse.
            return Err(Error::StaleLower);
        }
        // A lower hard link copied up without an index records no origin (its other names
        // stay below; kernel ovl_copy_up_one).
        let hardlink = file_type != FileType::Directory && st.st_nlink > 1;
        let index_dir = self.index_for(file_type, st.st_nlink);
        let origin = match hardlink && index_dir.is_none() {
            true => None,
            false => upper.origin_value(src_obj.as_fd(), &lower_uuid),
        };
        // With index=on a lower hard link is copied into the index once; every name then
        // links to that copy.
        let index = index_dir.zip(origin.as_deref().map(index::entry_name));
        if let Some((dir, entry)) = &index {
            if self.link_up(node, &parent, upper_dir.as_fd(), &name, dir, entry, &st)? {
                return Ok(());
            }
        }
        // The data of a metadata-only copy is found again by path (or redirect), as the
        // kernel does, so it needs no origin.
        // A lower file that is itself metadata-only (a former upper used as a lower layer) is
        // copied whole, its data taken from where it really is.
        let data_below = match node.state().metacopy {
            true => Some(self.real_parent(node, node.data_real()?.layer)?),
            false => None,
        };
        let meta =
            meta && file_type == FileType::RegularFile && index.is_none() && data_below.is_none();
        let work = upper.work.as_fd();
        let mut tmp = TempGuard::new(work, upper.tmp_name());
        debug!(target: "stratafs::upper", op = "copy_up", ?name, ?file_type, size = st.st_size, meta);
        match file_type {
            FileType::RegularFile if meta => {
                // A sparse file of the right size, as the kernel's metacopy files.
                let dst = vfs::do_create(work, tmp.name(), OFlags::WRONLY, 0o600)?;
                vfs::do_truncate(dst.as_fd(), st.st_size as u64)?;
            }
            FileType::RegularFile => {
                let src = match &data_below {
                    Some((dir, name)) => open_lower_file(dir.as_fd(), name)?,
                    None => open_lower_file(lower_dir.as_fd(), &lower_name)?,
                };
                let dst = vfs::do_create(work, tmp.name(), OFlags::WRONLY, 0o600)?;
                sys::fs::copy_data(
                    src.as_fd(),
                    dst.as_fd(),
                    st.st_size as u64,
                    self.copy_durability(),
                )
                .map_err(|e| Error::io("copy-up data", e))?;
            }
            FileType::Directory => vfs::do_mkdir(work, tmp.name(), 0o700)?,
            FileType::Symlink => {
                let target = sys::fs::read_link(lower_dir.as_fd(), &lower_name)
                    .map_err(|e| Error::io("copy-up readlink", e))?;
                vfs::do_symlink(OsStr::from_bytes(&target), work, tmp.name())?;
            }
            _ => vfs::do_mknod(work, tmp.name(), st.st_mode, st.st_rdev)?,
        }
        let dst_obj =
            sys::fs::open_path(work, tmp.name()).map_err(|e| Error::io("copy-up open", e))?;
        copy_xattrs(src_obj.as_fd(), dst_obj.as_fd())?;
        fileattr::copy_flags(src_obj.as_fd(), dst_obj.as_fd(), file_type);
        // Record where the copy came from, in the kernel's format (overlay.origin), and mark
        // the parent impure so that lookups and readdir know to look for origins there.
        if let Some(fh) = &origin {
            vfs::do_setxattr(dst_obj.as_fd(), &upper.xattr("origin"), fh, 0)?;
        }
        // The parent may now hold a non-pure upper entry (kernel ovl_do_copy_up).
        self.set_impure(&parent, upper_dir.as_fd())?;
        if meta {
            vfs::do_setxattr(dst_obj.as_fd(), &upper.xattr("metacopy"), b"", 0)?;
        }
        copy_attrs(work, tmp.name(), &st, self.upper_override(st.st_mode))?;
        if let Some((dir, entry)) = &index {
            // Into the index first (its link count still that of the lower file), then
            // linked into place: a crash in between leaves a valid index entry.
            vfs::do_setxattr(dst_obj.as_fd(), &upper.xattr("nlink"), b"L+0", 0)?;
            vfs::do_rename(work, tmp.name(), dir.as_fd(), entry, RENAME_NOREPLACE)?;
            tmp.disarm();
            if self.link_up(node, &parent, upper_dir.as_fd(), &name, dir, entry, &st)? {
                return Ok(());
            }
            return Err(Error::Internal("index entry vanished during copy-up"));
        }
        let upper_st =
            sys::fs::stat_fd(dst_obj.as_fd()).map_err(|e| Error::io("copy-up stat", e))?;
        vfs::do_rename(work, tmp.name(), upper_dir.as_fd(), &name, RENAME_NOREPLACE)?;
        tmp.disarm();
        {
            let mut state = node.state_mut();
            state.reals.insert(0, Real::at(LayerIdx::UPPER));
            if !node.is_dir() {
                state.reals.truncate(2);
            }
            state.metacopy = meta;
            state.origin = origin.is_some();
        }
        if node.is_dir() {
            self.cache_dir_fd(node.ino, LayerIdx::UPPER, Arc::new(dst_obj));
        }
        if hardlink {
            // Without an index the hard link breaks, as in the kernel: the other names stay
            // the lower file, from now on under a number of their own, so that two different
            // files never share one (kernel ovl_getattr: "lower hardlinks may be broken").
            self.split_link(top.layer, st.st_ino);
        }
        if hardlink || node.is_dir() {
            // The link count changed (a broken hard link has one name now; a merged directory
            // shows 1), and the kernel refreshes it on its own only when its cache times out.
            self.invalidate_attrs(node.ino);
        }
        // The copy keeps the node's number for every name it gets in the upper layer.
        self.record_origin(upper_st.st_ino, node.ino);
        if origin.is_some() {
            self.mark_has_origin(upper_st.st_ino);
        }
        Ok(())
    }
}

impl Overlay {
    /// With `index=on`: links the index copy `entry` of lower hard link `node` into the upper
    /// layer at `name` under `upper_dir` (kernel `ovl_link_up`), keeping the overlay link
    /// count. Returns false when there is no index copy yet.
    #[allow(clippy::too_many_arguments)]
    fn link_up(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        upper_dir: BorrowedFd<'_>,
        name: &OsStr,
        index_dir: &OwnedFd,
        entry: &OsStr,
        lower: &Stat,
    ) -> Result<bool> {
        let copy = match sys::fs::open_path(index_dir.as_fd(), entry) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(Error::io("open index entry", e)),
        };
        let copy_st = sys::fs::stat_fd(copy.as_fd()).map_err(|e| Error::io("stat", e))?;
        let nlink = self.indexed_nlink(copy.as_fd(), copy_st.st_nlink, lower.st_nlink)?;
        debug!(target: "stratafs::upper", op = "link_up", ?name, ?entry);
        match vfs::do_link(index_dir.as_fd(), entry, upper_dir, name) {
            Ok(()) => {}
            // Linked up already by name (a rename or replacement of this very name).
            Err(e)
                if e.errno() == libc::EEXIST
                    && sys::fs::stat_name(upper_dir, name)
                        .is_ok_and(|s| s.st_ino == copy_st.st_ino) => {}
            Err(e) => return Err(e),
        }
        self.set_impure(parent, upper_dir)?;
        self.store_nlink(copy.as_fd(), nlink)?;
        {
            let mut state = node.state_mut();
            state.reals.insert(0, Real::at(LayerIdx::UPPER));
            state.reals.truncate(2);
            state.metacopy = false;
            state.origin = true;
            state.indexed = true;
            state.index_copy = None;
        }
        self.record_origin(copy_st.st_ino, node.ino);
        self.mark_has_origin(copy_st.st_ino);
        self.invalidate_attrs(node.ino);
        Ok(true)
    }
}

/// Opens a lower regular file for reading without touching its atime when allowed.
fn open_lower_file(dir: BorrowedFd<'_>, name: &OsStr) -> Result<std::os::fd::OwnedFd> {
    sys::fs::open_beneath(dir, name, OFlags::RDONLY | OFlags::NOATIME)
        .or_else(|_| sys::fs::open_beneath(dir, name, OFlags::RDONLY))
        .map_err(|e| Error::io("copy-up open lower", e))
}

impl Overlay {
    /// Marks the upper copy of directory `dir` impure (`overlay.impure=y`) once.
    pub(crate) fn set_impure(&self, dir: &Node, upper_fd: BorrowedFd<'_>) -> Result<()> {
        let already = dir
            .state()
            .reals
            .first()
            .is_some_and(|r| r.layer.is_upper() && r.impure);
        if already {
            return Ok(());
        }
        let upper = self.upper_ctx()?;
        vfs::do_setxattr(upper_fd, &upper.xattr("impure"), b"y", 0)?;
        if let Some(r) = dir.state_mut().reals.first_mut() {
            r.impure = true;
        }
        Ok(())
    }
}

/// Owner, then mode (chown clears set-id bits), then times, as the lower object had them.
/// An owner the upper layer cannot take is kept in `owner_xattr` when the upper layer keeps
/// owners in one (`xattr_permissions=`), as fuse-overlayfs does.
pub fn copy_attrs(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    st: &Stat,
    owner_xattr: Option<OverrideXattr>,
) -> Result<()> {
    if let Err(e) = vfs::do_chown(dir, name, Some(st.st_uid), Some(st.st_gid)) {
        let Some(which) = owner_xattr else {
            return Err(e);
        };
        let obj = sys::fs::open_path(dir, name).map_err(|e| Error::io("copy-up open", e))?;
        if override_stat::read(obj.as_fd(), which).is_none() {
            override_stat::write(obj.as_fd(), which, Owner::of(st))?;
        }
    }
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        vfs::do_chmod(dir, name, st.st_mode)?;
    }
    vfs::do_utimes(
        dir,
        name,
        TimeSpec::At(st.st_atime, st.st_atime_nsec as u32),
        TimeSpec::At(st.st_mtime, st.st_mtime_nsec as u32),
    )
}

/// Copies every extended attribute but the overlay's private ones. Attributes the upper
/// filesystem or our privileges cannot hold (`trusted.*` in a user namespace, `security.*`
/// labels) are skipped, as the kernel's `ovl_copy_xattr` does.
pub fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<()> {
    let names = match sys::fs::list_xattr(src) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(Error::io("copy-up listxattr", e)),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if whiteout::is_private_xattr(name) {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let Some(value) =
            sys::fs::get_xattr(src, name).map_err(|e| Error::io("copy-up getxattr", e))?
        else {
            continue;
        };
        match sys::fs::set_xattr(dst, name, &value, 0) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) => {
                debug!(target: "stratafs::upper", ?name, error = %e, "xattr not copied up");
            }
            Err(e) => return Err(Error::io("copy-up setxattr", e)),
        }
    }
    Ok(())
}
