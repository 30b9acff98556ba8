//! Namespace operations: create, mkdir, mknod, symlink, link, unlink, rmdir
//! (kernel `fs/overlayfs/dir.c`).
//!
//! New objects go straight into the upper layer, except over a whiteout: then they are built
//! in the workdir (a directory made opaque first) and swapped in with `RENAME_EXCHANGE`, so the
//! name is never missing nor doubled. Removing a name that exists in a lower layer leaves a
//! whiteout, swapped in the same way.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustix::fs::{FileType, OFlags};

use crate::error::{Error, Result};
use crate::ovl::acl;
use crate::ovl::copy_up::{RENAME_EXCHANGE, RENAME_NOREPLACE, TempGuard};
use crate::ovl::inode::{Node, NodeState};
use crate::ovl::layer::LayerIdx;
use crate::ovl::namei::{Found, check_name};
use crate::ovl::override_stat::{self, Owner};
use crate::ovl::{Entry, Overlay, vfs, whiteout};
use crate::sys;

/// The credentials a request runs with: owner of what it creates.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// fsuid.
    pub uid: u32,
    /// fsgid.
    pub gid: u32,
    /// The caller's umask, applied here where the parent has no default ACL (0 when the
    /// kernel applied it already).
    pub umask: u32,
}

/// What is at a name in the upper layer, before something is created there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpperSlot {
    /// Nothing.
    Empty,
    /// A whiteout object (0/0 device or xattr whiteout) sits at the name.
    Whiteout,
    /// A `.wh.NAME` file hides the name.
    WhFile,
}

/// What kind of object to create.
pub enum NewObject<'a> {
    /// A regular file, returned open with these flags.
    File(OFlags),
    /// A directory.
    Dir,
    /// A fifo, socket or device (`mode` carries the type).
    Node(u64),
    /// A symlink to this target.
    Symlink(&'a OsStr),
}

impl Overlay {
    /// Creates `name` in `parent` with `mode` (type bits included) owned by `caller`; returns
    /// its entry and, for regular files, an open descriptor.
    pub fn create_object(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        mode: u32,
        what: NewObject<'_>,
        caller: Caller,
    ) -> Result<(Entry, Option<OwnedFd>)> {
        check_name(name)?;
        if whiteout::is_reserved_name(name) {
            return Err(Error::InvalidName);
        }
        if let NewObject::Node(0) = what {
            // Kernel ovl_mknod: "Don't allow creation of "whiteout" on overlay".
            if mode & libc::S_IFMT == libc::S_IFCHR {
                return Err(Error::WhiteoutDevice);
            }
        }
        self.want_write()?;
        if !parent.is_dir() {
            return Err(Error::NotDir);
        }
        self.copy_up(parent)?;
        let upper = self.upper_ctx()?;
        let udir = self.real_dir_fd(parent, LayerIdx::UPPER)?;
        let slot = upper_slot(udir.as_fd(), name)?;
        let upper_only = {
            let st = parent.state();
            st.reals.len() == 1 && st.reals[0].layer.is_upper()
        };
        // In a directory only the upper layer has, nothing in the upper means nothing at all
        // (the search would look at the same two names again).
        let exists = match (upper_only, slot) {
            (true, UpperSlot::Empty | UpperSlot::WhFile) => false,
            _ => self.lookup_real(parent, name)?.is_some(),
        };
        if exists {
            return Err(Error::io(
                "create",
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let parent_st = sys::fs::stat_fd(udir.as_fd()).map_err(|e| Error::io("stat parent", e))?;
        // New objects belong to the caller; in a set-group-id directory they take its group,
        // and directories inherit the bit (inode_init_owner).
        let sgid_parent = parent_st.st_mode & libc::S_ISGID != 0;
        let gid = if sgid_parent {
            parent_st.st_gid
        } else {
            caller.gid
        };
        let is_dir = matches!(what, NewObject::Dir);
        let parent_default = match self.cfg.acl {
            true => acl::parent_default(udir.as_fd())?,
            false => None,
        };
        let acls = acl::for_new_object(
            mode & 0o7777,
            caller.umask,
            is_dir,
            parent_default.as_deref(),
        )?;
        let mut perm = acls.perm;
        if is_dir && sgid_parent {
            perm |= libc::S_ISGID;
        }
        let (dir, obj_name, mut guard) = match slot {
            UpperSlot::Empty => (udir.as_fd(), name.to_owned(), None),
            _ => {
                let t = upper.tmp_name();
                (
                    upper.work.as_fd(),
                    t.clone(),
                    Some(TempGuard::new(upper.work.as_fd(), t)),
                )
            }
        };
        let fd = make(dir, &obj_name, &what, mode, perm)?;
        // With xattr_permissions= the owner goes into the attribute, the inode keeps ours.
        let owner_xattr = match what {
            NewObject::File(_) => self.upper_override(libc::S_IFREG),
            NewObject::Dir => self.upper_override(libc::S_IFDIR),
            _ => None,
        };
        let mut owned_as_created = false;
        match owner_xattr {
            Some(which) => {
                let obj = sys::fs::open_path(dir, &obj_name).map_err(|e| Error::io("open", e))?;
                let owner = Owner {
                    uid: caller.uid,
                    gid,
                    mode: perm,
                };
                override_stat::write(obj.as_fd(), which, owner)?;
            }
            // Created by us, it is already owned by the caller when the caller is us.
            None if (caller.uid, gid) == self.created_owner(&parent_st) => owned_as_created = true,
            None => match vfs::do_chown(dir, &obj_name, Some(caller.uid), Some(gid)) {
                // Squashed owners: an owner the layers cannot take is not an error
                // (fuse-overlayfs), the object shows the squashed owner anyway.
                Err(_) if self.cfg.ids.squashes() => {}
                other => other?,
            },
        }
        // A regular file created with `perm` (our umask is 0), not chowned since, in a
        // directory known to have no default ACL (so none to write either), already has that
        // mode (set-id bits aside: creation may drop them).
        let has_mode = owned_as_created
            && matches!(what, NewObject::File(_))
            && perm & (libc::S_ISUID | libc::S_ISGID) == 0
            && self.cfg.acl
            && parent_default.is_none();
        if !matches!(what, NewObject::Symlink(_)) && !has_mode {
            // chown may have cleared set-id bits; and the daemon's umask is 0, so this is the
            // mode the caller asked for.
            vfs::do_chmod(dir, &obj_name, perm)?;
            if acls.access.is_some() || acls.default.is_some() {
                set_acls(dir, &obj_name, &acls)?;
            }
        }
        if let Some(g) = guard.as_mut() {
            if is_dir {
                self.set_opaque(dir, &obj_name)?;
            }
            match slot {
                UpperSlot::Whiteout => {
                    vfs::do_rename(dir, &obj_name, udir.as_fd(), name, RENAME_EXCHANGE)?;
                    // The guard now removes the whiteout that was swapped out.
                }
                _ => {
                    vfs::do_rename(dir, &obj_name, udir.as_fd(), name, RENAME_NOREPLACE)?;
                    g.disarm();
                    vfs::do_unlink(udir.as_fd(), &whiteout::wh_name(name))?;
                }
            }
        }
        drop(guard);
        if is_dir
            && slot == UpperSlot::Empty
            && parent.is_merged_dir()
            && !self.allows_offline_changes()
        {
            // As the kernel does: a new directory in a merged one is opaque, so lookups in it
            // never search the lower layers (an optimisation; failure is harmless).
            let _ = self.set_opaque(udir.as_fd(), name);
        }
        let entry = self.lookup(parent, name)?;
        Ok((entry, fd))
    }

    /// Marks the directory `name` in `dir` opaque, in the encoding(s) this mount writes.
    fn set_opaque(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        let upper = self.upper_ctx()?;
        let fd = sys::fs::open_dir_path(dir, name).map_err(|e| Error::io("open new dir", e))?;
        vfs::do_setxattr(fd.as_fd(), &upper.opaque_xattr(), b"y", 0)?;
        if upper.wh_files.load(Ordering::Relaxed) {
            let marker = vfs::do_create(
                fd.as_fd(),
                OsStr::from_bytes(whiteout::OPAQUE_MARKER),
                OFlags::WRONLY,
                0o600,
            )?;
            drop(marker);
        }
        Ok(())
    }

    /// Adds the name `newname` in `newparent` for the existing non-directory `node`: copy-up,
    /// then a link in the upper layer (kernel `ovl_link`).
    pub fn link(&self, node: &Arc<Node>, newparent: &Arc<Node>, newname: &OsStr) -> Result<Entry> {
        check_name(newname)?;
        if whiteout::is_reserved_name(newname) {
            return Err(Error::InvalidName);
        }
        if node.is_dir() {
            return Err(Error::io(
                "link",
                std::io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        self.want_write()?;
        self.copy_up(node)?;
        if node.state().metacopy {
            // Every name of a metadata-only file must lead to its data: an absolute redirect
            // (kernel ovl_set_link_redirect).
            self.set_redirect(node, false)?;
        }
        self.copy_up(newparent)?;
        if self.lookup_real(newparent, newname)?.is_some() {
            return Err(Error::io(
                "link",
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let upper = self.upper_ctx()?;
        // The object itself, even if the name it was found under is gone since.
        let obj = self.real_path_fd(node)?;
        let udir = self.real_dir_fd(newparent, LayerIdx::UPPER)?;
        let link_into = |dir: std::os::fd::BorrowedFd<'_>, name: &OsStr| -> Result<()> {
            vfs::do_link_fd(obj.as_fd(), dir, name)
        };
        match upper_slot(udir.as_fd(), newname)? {
            UpperSlot::Empty => link_into(udir.as_fd(), newname)?,
            slot => {
                let tmp = upper.tmp_name();
                let work = upper.work.as_fd();
                link_into(work, &tmp)?;
                let mut guard = TempGuard::new(work, tmp.clone());
                if slot == UpperSlot::Whiteout {
                    vfs::do_rename(work, &tmp, udir.as_fd(), newname, RENAME_EXCHANGE)?;
                } else {
                    vfs::do_rename(work, &tmp, udir.as_fd(), newname, RENAME_NOREPLACE)?;
                    guard.disarm();
                    vfs::do_unlink(udir.as_fd(), &whiteout::wh_name(newname))?;
                }
            }
        }
        if node.has_origin() {
            // Like a rename, a link with an origin makes its directory impure (kernel
            // ovl_create_or_link).
            self.set_impure(newparent, udir.as_fd())?;
        }
        // The new name shows the same inode (same node), not a second one.
        let stat = self.getattr(node)?;
        self.inodes.add_lookup(node);
        Ok(Entry {
            node: node.clone(),
            stat,
        })
    }

    /// Removes the non-directory `name` from `parent` (kernel `ovl_unlink`).
    pub fn unlink(&self, parent: &Arc<Node>, name: &OsStr) -> Result<()> {
        check_name(name)?;
        self.want_write()?;
        let found = self.lookup_real(parent, name)?.ok_or(Error::NotFound)?;
        if FileType::from_raw_mode(found.top_stat.st_mode) == FileType::Directory {
            return Err(Error::io(
                "unlink",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        self.copy_up(parent)?;
        let found = self.prepare_indexed_name(parent, name, found)?;
        self.unlink_indexed(parent, name, &found, || {
            self.remove_entry(parent, name, &found, false)
        })
    }

    /// Removes the empty directory `name` from `parent` (kernel `ovl_rmdir`).
    pub fn rmdir(&self, parent: &Arc<Node>, name: &OsStr) -> Result<()> {
        check_name(name)?;
        self.want_write()?;
        let found = self.lookup_real(parent, name)?.ok_or(Error::NotFound)?;
        if FileType::from_raw_mode(found.top_stat.st_mode) != FileType::Directory {
            return Err(Error::NotDir);
        }
        let probe = Node::new(
            self.ino_for(found.reals[0].layer, found.top_stat.st_ino),
            FileType::Directory,
            NodeState::new(Some(parent.clone()), name.to_owned(), found.reals.clone()),
        );
        if self.read_merged(&probe)?.len() > 2 {
            return Err(Error::io(
                "rmdir",
                std::io::Error::from_raw_os_error(libc::ENOTEMPTY),
            ));
        }
        self.copy_up(parent)?;
        self.remove_entry(parent, name, &found, true)?;
        self.forget_dir_fds(probe.ino, &found.reals);
        Ok(())
    }

    /// Takes `name` out of the merged view: a whiteout when a lower layer has the name, else a
    /// plain removal from the upper layer. A directory leaves through the workdir, together
    /// with whatever whiteouts it held.
    pub(crate) fn remove_entry(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: &Found,
        is_dir: bool,
    ) -> Result<()> {
        let udir = self.real_dir_fd(parent, LayerIdx::UPPER)?;
        let in_upper = found.reals[0].layer.is_upper();
        let ino = self.ino_for(found.reals[0].layer, found.top_stat.st_ino);
        let node = self.inodes.get(ino).ok();
        // A handle on the upper object keeps it reachable (fstat through open handles, other
        // hard links) once this name is gone, and tells whether it died.
        let upper_obj = match in_upper {
            true => sys::fs::open_path(udir.as_fd(), name).ok().map(Arc::new),
            false => None,
        };
        let upper_ino = upper_obj
            .as_ref()
            .and_then(|fd| sys::fs::stat_fd(fd.as_fd()).ok())
            .map(|s| s.st_ino);
        if let (Some(node), Some(fd), false) = (&node, &upper_obj, is_dir) {
            node.state_mut().detached = Some(fd.clone());
        }
        let need_whiteout = self.lower_positive(parent, name)?;
        if need_whiteout {
            self.whiteout_over(udir.as_fd(), name, in_upper)?;
        } else if in_upper {
            if is_dir {
                self.remove_upper_dir(udir.as_fd(), name)?;
            } else {
                vfs::do_unlink(udir.as_fd(), name)?;
            }
        }
        let gone = match (&upper_obj, is_dir) {
            (_, true) => true,
            (Some(fd), false) => sys::fs::stat_fd(fd.as_fd())
                .map(|s| s.st_nlink == 0)
                .unwrap_or(true),
            (None, false) => found.top_stat.st_nlink <= 1,
        };
        if gone {
            if let Some(node) = node {
                node.dead.store(true, Ordering::Relaxed);
            }
            if let Some(u) = upper_ino {
                // The upper inode number may be reused by an unrelated object.
                self.forget_origin(u);
            }
        }
        Ok(())
    }

    /// Removes the upper directory `name` in `udir` with whatever it holds: moved into the
    /// workdir first, so that it leaves the merged view at once and a crash leaves nothing
    /// half removed in the upper layer.
    pub(crate) fn remove_upper_dir(&self, udir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        let upper = self.upper_ctx()?;
        let tmp = upper.tmp_name();
        vfs::do_rename(udir, name, upper.work.as_fd(), &tmp, RENAME_NOREPLACE)?;
        vfs::do_remove_tree(upper.work.as_fd(), &tmp)
    }

    /// Puts a whiteout at `name` in the upper directory `udir`, atomically replacing what the
    /// upper layer has there (`in_upper`), prepared in the workdir (kernel
    /// `ovl_cleanup_and_whiteout`).
    pub(crate) fn whiteout_over(
        &self,
        udir: BorrowedFd<'_>,
        name: &OsStr,
        in_upper: bool,
    ) -> Result<()> {
        let upper = self.upper_ctx()?;
        let work = upper.work.as_fd();
        if !upper.wh_files.load(Ordering::Relaxed) {
            let tmp = upper.tmp_name();
            match self.make_whiteout(work, &tmp) {
                Ok(()) => {
                    let mut guard = TempGuard::new(work, tmp.clone());
                    if in_upper {
                        // After the exchange the guard removes what used to be at `name`.
                        vfs::do_rename(work, &tmp, udir, name, RENAME_EXCHANGE)?;
                    } else {
                        vfs::do_rename(work, &tmp, udir, name, RENAME_NOREPLACE)?;
                        guard.disarm();
                    }
                    return Ok(());
                }
                Err(e) if e.errno() == libc::EPERM => {
                    // Unprivileged and no whiteout mknod: fall back to .wh. files for good.
                    upper.wh_files.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let tmp = upper.tmp_name();
        drop(vfs::do_create(work, &tmp, OFlags::WRONLY, 0o600)?);
        let mut guard = TempGuard::new(work, tmp.clone());
        match vfs::do_rename(work, &tmp, udir, &whiteout::wh_name(name), RENAME_NOREPLACE) {
            Ok(()) => guard.disarm(),
            Err(e) if e.errno() == libc::EEXIST => {}
            Err(e) => return Err(e),
        }
        if in_upper {
            let gone = upper.tmp_name();
            vfs::do_rename(udir, name, work, &gone, RENAME_NOREPLACE)?;
            vfs::do_remove_tree(work, &gone)?;
        }
        Ok(())
    }

    /// Creates a whiteout at `tmp` in the workdir: a new link to one shared 0/0 device kept
    /// in the workdir, as the kernel does (`ovl_whiteout`: whiteouts share an inode), or a new
    /// device when links run out.
    fn make_whiteout(&self, work: BorrowedFd<'_>, tmp: &OsStr) -> Result<()> {
        let upper = self.upper_ctx()?;
        let mut shared = upper
            .shared_whiteout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shared.is_none() {
            let name = upper.tmp_name();
            vfs::do_mknod(work, &name, libc::S_IFCHR, 0)?;
            *shared = Some(name);
        }
        if let Some(name) = shared.as_ref() {
            match vfs::do_link(work, name, work, tmp) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.errno(), libc::EMLINK | libc::ENOENT) => *shared = None,
                Err(e) => return Err(e),
            }
        }
        vfs::do_mknod(work, tmp, libc::S_IFCHR, 0)
    }

    /// Whether a layer below the upper one shows `name` under `parent` (kernel
    /// `ovl_lower_positive`): then removing it needs a whiteout.
    pub(crate) fn lower_positive(&self, parent: &Node, name: &OsStr) -> Result<bool> {
        let reals = parent.lower_reals();
        for r in reals {
            let dir = self.real_dir_fd(parent, r.layer)?;
            match sys::fs::stat_name(dir.as_fd(), name) {
                Ok(st) => {
                    let xwh = r.xwhiteouts
                        && whiteout::may_be_xattr_whiteout(&st)
                        && whiteout::is_xattr_whiteout(dir.as_fd(), name).unwrap_or(false);
                    return Ok(!(whiteout::is_chardev_whiteout(&st) || xwh));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if whiteout::has_wh_file(dir.as_fd(), name)
                        .map_err(|e| Error::io("lookup .wh.", e))?
                    {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(Error::io("lookup lower", e)),
            }
        }
        Ok(false)
    }
}

/// What the upper directory holds at `name` (before a create).
fn upper_slot(udir: BorrowedFd<'_>, name: &OsStr) -> Result<UpperSlot> {
    match sys::fs::stat_name(udir, name) {
        Ok(_) => Ok(UpperSlot::Whiteout),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            if whiteout::has_wh_file(udir, name).map_err(|e| Error::io("lookup .wh.", e))? {
                Ok(UpperSlot::WhFile)
            } else {
                Ok(UpperSlot::Empty)
            }
        }
        Err(e) => Err(Error::io("lookup upper", e)),
    }
}

/// Creates the object itself (no owner or final mode yet).
/// Writes the ACLs a new object inherits (see [`acl`]).
fn set_acls(dir: BorrowedFd<'_>, name: &OsStr, acls: &acl::NewAcls) -> Result<()> {
    let fd = sys::fs::open_path(dir, name).map_err(|e| Error::io("open new object", e))?;
    for (xattr, value) in [(acl::ACCESS, &acls.access), (acl::DEFAULT, &acls.default)] {
        if let Some(v) = value {
            vfs::do_setxattr(fd.as_fd(), OsStr::new(xattr), v, 0)?;
        }
    }
    Ok(())
}

fn make(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    what: &NewObject<'_>,
    mode: u32,
    perm: u32,
) -> Result<Option<OwnedFd>> {
    match what {
        NewObject::File(flags) => {
            let flags = *flags
                & !(OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::TRUNC
                    | OFlags::APPEND
                    | OFlags::NOCTTY);
            vfs::do_create(dir, name, flags, perm).map(Some)
        }
        NewObject::Dir => vfs::do_mkdir(dir, name, perm).map(|_| None),
        NewObject::Node(rdev) => {
            if FileType::from_raw_mode(mode) == FileType::RegularFile {
                return vfs::do_create(dir, name, OFlags::WRONLY, perm).map(|_| None);
            }
            vfs::do_mknod(dir, name, (mode & libc::S_IFMT) | perm, *rdev).map(|_| None)
        }
        NewObject::Symlink(target) => vfs::do_symlink(target, dir, name).map(|_| None),
    }
}
