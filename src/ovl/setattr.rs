//! setattr: chmod, chown, truncate, utimens (kernel `ovl_setattr` in `inode.c`). Each copies
//! the object up first, then changes the upper copy through an `O_PATH` handle on it, so an
//! object that lost the name it was found under (unlinked hard link, open unlinked file) is
//! still reachable.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use rustix::fs::{FileType, OFlags, Stat};

use crate::error::{Error, Result};
use crate::ovl::inode::Node;
use crate::ovl::override_stat::{self, OverrideXattr, Owner};
use crate::ovl::{Overlay, vfs};
use crate::sys;
use crate::sys::fs::TimeSpec;

/// The changes one setattr request asks for.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    /// New permission bits (and set-id/sticky bits).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSpec>,
    /// New modification time.
    pub mtime: Option<TimeSpec>,
}

impl Overlay {
    /// Applies `attr` to `node` and returns the new attributes. `fh`, when the kernel passes
    /// one (ftruncate), is an open handle on the file.
    pub fn setattr(&self, node: &Arc<Node>, attr: SetAttr, fh: Option<u64>) -> Result<Stat> {
        self.want_write()?;
        if attr.size.is_some() {
            self.copy_up_data(node)?;
        } else {
            self.copy_up(node)?;
        }
        let obj = self.real_path_fd(node)?;
        if let Some(size) = attr.size {
            if node.is_dir() {
                return Err(Error::io(
                    "truncate",
                    std::io::Error::from_raw_os_error(libc::EISDIR),
                ));
            }
            match fh.and_then(|f| self.handle_fd(f).ok()) {
                Some(fd) => vfs::do_truncate(fd.as_fd(), size)?,
                None => {
                    let w = sys::fs::reopen(obj.as_fd(), OFlags::WRONLY)
                        .map_err(|e| Error::io("truncate open", e))?;
                    vfs::do_truncate(w.as_fd(), size)?
                }
            }
        }
        let owner_xattr = self.upper_override(node.file_type.as_raw_mode());
        if let Some(which) = owner_xattr {
            if attr.uid.is_some() || attr.gid.is_some() || attr.mode.is_some() {
                set_override(obj.as_fd(), which, &attr)?;
            }
        } else if attr.uid.is_some() || attr.gid.is_some() {
            match vfs::do_chown_fd(obj.as_fd(), attr.uid, attr.gid) {
                // Squashed owners: a chown the layers refuse succeeds without effect
                // (fuse-overlayfs); nothing shows the owner anyway.
                Err(_) if self.cfg.ids.squashes() => {}
                other => other?,
            }
        }
        if let (Some(mode), None) = (attr.mode, owner_xattr) {
            if node.file_type != FileType::Symlink {
                vfs::do_chmod_fd(obj.as_fd(), mode)?;
            }
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            vfs::do_utimes_fd(
                obj.as_fd(),
                attr.atime.unwrap_or(TimeSpec::Omit),
                attr.mtime.unwrap_or(TimeSpec::Omit),
            )?;
        }
        self.getattr(node)
    }
}

/// chown/chmod recorded in the override attribute `which` instead of the inode
/// (`xattr_permissions=`): the real owner and mode stay. A chown clears the set-user-id bit
/// and a group-executable set-group-id bit, as the kernel does for a real one.
fn set_override(obj: BorrowedFd<'_>, which: OverrideXattr, attr: &SetAttr) -> Result<()> {
    let real = sys::fs::stat_fd(obj).map_err(|e| Error::io("stat", e))?;
    let mut owner = override_stat::read(obj, which).unwrap_or_else(|| Owner::of(&real));
    let is_dir = FileType::from_raw_mode(real.st_mode) == FileType::Directory;
    if attr.uid.is_some() || attr.gid.is_some() {
        owner.uid = attr.uid.unwrap_or(owner.uid);
        owner.gid = attr.gid.unwrap_or(owner.gid);
        if !is_dir {
            owner.mode &= !libc::S_ISUID;
            if owner.mode & libc::S_IXGRP != 0 {
                owner.mode &= !libc::S_ISGID;
            }
        }
    }
    if let Some(mode) = attr.mode {
        owner.mode = mode & 0o7777;
    }
    override_stat::write(obj, which, owner)
}
