//! setattr: chmod, chown, truncate, utimens (kernel `ovl_setattr` in `inode.c`). Each copies
//! the object up first, then changes the upper copy.

use std::os::fd::AsFd;
use std::sync::Arc;

use rustix::fs::{FileType, OFlags, Stat};

use crate::error::{Error, Result};
use crate::ovl::inode::Node;
use crate::ovl::layer::LayerIdx;
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
        self.copy_up(node)?;
        let detached = node.state().detached.clone();
        if let Some(size) = attr.size {
            if node.is_dir() {
                return Err(Error::io(
                    "truncate",
                    std::io::Error::from_raw_os_error(libc::EISDIR),
                ));
            }
            match (fh.and_then(|f| self.handle_fd(f).ok()), &detached) {
                (Some(fd), _) => vfs::do_truncate(fd.as_fd(), size)?,
                (None, Some(fd)) => {
                    let w = sys::fs::reopen(fd.as_fd(), OFlags::WRONLY)
                        .map_err(|e| Error::io("truncate", e))?;
                    vfs::do_truncate(w.as_fd(), size)?
                }
                (None, None) => {
                    let (dir, name) = self.real_parent(node, LayerIdx::UPPER)?;
                    let w = sys::fs::open_beneath(dir.as_fd(), &name, OFlags::WRONLY)
                        .map_err(|e| Error::io("truncate open", e))?;
                    vfs::do_truncate(w.as_fd(), size)?
                }
            }
        }
        let ids = attr.uid.is_some() || attr.gid.is_some();
        let times = attr.atime.is_some() || attr.mtime.is_some();
        if ids || attr.mode.is_some() || times {
            let (dir, name) = if node.is_dir() {
                let (p, n) = node.parent_and_name();
                match p {
                    Some(p) => (self.real_dir_fd(&p, LayerIdx::UPPER)?, n),
                    None => {
                        // The root: change it through its own handle.
                        let fd = self.real_dir_fd(node, LayerIdx::UPPER)?;
                        return self
                            .setattr_root(fd.as_fd(), attr)
                            .and_then(|_| self.getattr(node));
                    }
                }
            } else {
                self.real_parent(node, LayerIdx::UPPER)?
            };
            if ids {
                vfs::do_chown(dir.as_fd(), &name, attr.uid, attr.gid)?;
            }
            if let Some(mode) = attr.mode {
                if node.file_type != FileType::Symlink {
                    vfs::do_chmod(dir.as_fd(), &name, mode)?;
                }
            }
            if times {
                vfs::do_utimes(
                    dir.as_fd(),
                    &name,
                    attr.atime.unwrap_or(TimeSpec::Omit),
                    attr.mtime.unwrap_or(TimeSpec::Omit),
                )?;
            }
        }
        self.getattr(node)
    }

    /// setattr of the root directory, which has no parent to work from.
    fn setattr_root(&self, fd: std::os::fd::BorrowedFd<'_>, attr: SetAttr) -> Result<()> {
        if attr.uid.is_some() || attr.gid.is_some() {
            sys::fs::chown_fd(fd, attr.uid, attr.gid).map_err(|e| Error::io("chown", e))?;
        }
        if let Some(mode) = attr.mode {
            sys::fs::chmod_fd(fd, mode).map_err(|e| Error::io("chmod", e))?;
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            sys::fs::set_times_fd(
                fd,
                attr.atime.unwrap_or(TimeSpec::Omit),
                attr.mtime.unwrap_or(TimeSpec::Omit),
            )
            .map_err(|e| Error::io("utimes", e))?;
        }
        Ok(())
    }
}
