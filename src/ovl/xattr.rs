//! User-visible extended attributes (kernel `fs/overlayfs/xattrs.c`): those of the top real
//! object, with the overlay's private names hidden.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ovl::inode::Node;
use crate::ovl::{Overlay, override_stat, vfs, whiteout};
use crate::sys;

impl Overlay {
    /// Value of attribute `name` of `node`.
    pub fn getxattr(&self, node: &Node, name: &OsStr) -> Result<Vec<u8>> {
        if self.cfg.noxattrs {
            return Err(Error::NotSupported);
        }
        if self.hides_xattr(name.as_bytes()) {
            return Err(Error::NoXattr);
        }
        let value = match self.real_entry(node)? {
            // One getxattrat(2) instead of an open, a getxattr and a close, where it exists.
            Some((dir, entry)) => match sys::fs::get_xattr_at(dir.as_fd(), &entry, name) {
                Some(found) => found,
                None => sys::fs::get_xattr(self.real_path_fd(node)?.as_fd(), name),
            },
            None => sys::fs::get_xattr(self.real_path_fd(node)?.as_fd(), name),
        };
        value
            .map_err(|e| Error::io("getxattr", e))?
            .ok_or(Error::NoXattr)
    }

    /// Sets attribute `name` of `node` (copying it up first); the overlay's private names
    /// are refused.
    pub fn setxattr(&self, node: &Arc<Node>, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if self.cfg.noxattrs {
            return Err(Error::NotSupported);
        }
        if self.hides_xattr(name.as_bytes()) {
            return Err(Error::io(
                "setxattr",
                std::io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        self.copy_up(node)?;
        let fd = self.real_path_fd(node)?;
        vfs::do_setxattr(fd.as_fd(), name, value, flags as u32)
    }

    /// Removes attribute `name` of `node` (copying it up first).
    pub fn removexattr(&self, node: &Arc<Node>, name: &OsStr) -> Result<()> {
        if self.cfg.noxattrs {
            return Err(Error::NotSupported);
        }
        if self.hides_xattr(name.as_bytes()) {
            return Err(Error::io(
                "removexattr",
                std::io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        // Nothing to copy up for an attribute that does not exist.
        self.getxattr(node, name)?;
        self.copy_up(node)?;
        let fd = self.real_path_fd(node)?;
        vfs::do_removexattr(fd.as_fd(), name)
    }

    /// Names of the attributes of `node`, NUL-terminated and concatenated as `listxattr(2)`
    /// returns them.
    pub fn listxattr(&self, node: &Node) -> Result<Vec<u8>> {
        if self.cfg.noxattrs {
            return Ok(Vec::new());
        }
        let fd = self.real_path_fd(node)?;
        let raw = sys::fs::list_xattr(fd.as_fd()).map_err(|e| Error::io("listxattr", e))?;
        Ok(filter_private(&raw, |n| self.hides_xattr(n)))
    }

    /// Names the merged view hides: the overlay's private ones, and the owner-override
    /// attributes when a layer keeps owners in them.
    fn hides_xattr(&self, name: &[u8]) -> bool {
        whiteout::is_private_xattr(name)
            || (self.layers.any_override && override_stat::is_override_name(name))
    }
}

/// Drops the names `hidden` says from a raw `listxattr` buffer.
fn filter_private(raw: &[u8], hidden: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for name in raw.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if !hidden(name) {
            out.extend_from_slice(name);
            out.push(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_names_are_filtered() {
        let raw =
            b"user.a\0trusted.overlay.opaque\0security.capability\0user.fuseoverlayfs.origin\0";
        assert_eq!(
            filter_private(raw, whiteout::is_private_xattr),
            b"user.a\0security.capability\0".to_vec()
        );
    }
}
