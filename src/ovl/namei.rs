//! Lookup across layers (kernel `fs/overlayfs/namei.c`, `ovl_lookup`).
//!
//! A name is searched from the top layer down in every layer where the parent directory has
//! a real copy. The search stops at a whiteout, at a non-directory (it hides everything
//! below), at an opaque directory, and at a non-directory found below a directory.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{FileType, Stat};

use crate::error::{Error, Result};
use crate::ovl::inode::{self, Node, NodeState, Real};
use crate::ovl::layer::LayerIdx;
use crate::ovl::{Entry, Overlay, whiteout};
use crate::sys;

/// Longest name a layer filesystem accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// The real objects behind one merged name.
#[derive(Debug)]
pub struct Found {
    /// Real objects, top first (see [`NodeState::reals`]).
    pub reals: Vec<Real>,
    /// `lstat` of the top one.
    pub top_stat: Stat,
    /// Directory handles opened on the way, worth caching once the inode number is known.
    dir_fds: Vec<(LayerIdx, OwnedFd)>,
}

/// Checks a name from a request before it reaches a layer.
pub fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if b.is_empty() || b.contains(&b'/') || b.contains(&0) {
        return Err(Error::InvalidName);
    }
    Ok(())
}

impl Overlay {
    /// Looks `name` up in the directory `parent` and counts one kernel reference to the
    /// resulting node.
    pub fn lookup(&self, parent: &Arc<Node>, name: &OsStr) -> Result<Entry> {
        check_name(name)?;
        if !parent.is_dir() {
            return Err(Error::NotDir);
        }
        match name.as_bytes() {
            b"." => return self.lookup_existing(parent.clone()),
            b".." => {
                let up = parent
                    .state()
                    .parent
                    .clone()
                    .unwrap_or_else(|| parent.clone());
                return self.lookup_existing(up);
            }
            _ => {}
        }
        let found = self.lookup_real(parent, name)?.ok_or(Error::NotFound)?;
        Ok(self.install(parent, name, found))
    }

    /// Searches the layers for `name` under `parent`; `None` when the merged view has no such
    /// entry.
    pub fn lookup_real(&self, parent: &Node, name: &OsStr) -> Result<Option<Found>> {
        if whiteout::is_reserved_name(name) {
            return Ok(None);
        }
        let parent_reals = parent.state().reals.clone();
        let mut reals: Vec<Real> = Vec::new();
        let mut top_stat: Option<Stat> = None;
        let mut dir_fds = Vec::new();
        for pr in parent_reals {
            let dir = self.real_dir_fd(parent, pr.layer)?;
            let st = match sys::fs::stat_name(dir.as_fd(), name) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if whiteout::has_wh_file(dir.as_fd(), name)
                        .map_err(|e| Error::io("look for .wh. whiteout", e))?
                    {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(Error::io("lookup", e)),
            };
            if whiteout::is_chardev_whiteout(&st) {
                break;
            }
            if pr.xwhiteouts
                && whiteout::may_be_xattr_whiteout(&st)
                && whiteout::is_xattr_whiteout(dir.as_fd(), name)
                    .map_err(|e| Error::io("read xattr whiteout", e))?
            {
                break;
            }
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            if top_stat.is_none() {
                top_stat = Some(st);
                if !is_dir {
                    reals.push(Real {
                        layer: pr.layer,
                        xwhiteouts: false,
                    });
                    break;
                }
            } else if !is_dir {
                // A non-directory below a directory ends the stack (kernel: `d.stop`).
                break;
            }
            let fd = sys::fs::open_dir_path(dir.as_fd(), name)
                .map_err(|e| Error::io("open real directory", e))?;
            let markers =
                whiteout::dir_markers(fd.as_fd()).map_err(|e| Error::io("read dir markers", e))?;
            reals.push(Real {
                layer: pr.layer,
                xwhiteouts: markers.xwhiteouts,
            });
            dir_fds.push((pr.layer, fd));
            if markers.opaque {
                break;
            }
        }
        Ok(top_stat.map(|top_stat| Found {
            reals,
            top_stat,
            dir_fds,
        }))
    }

    /// Turns a search result into a node (new, or the one already known under the same inode
    /// number) and its attributes.
    fn install(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> Entry {
        let top = found.reals[0];
        let ino = self.ino_for(top.layer, found.top_stat.st_ino);
        let candidate = Node::new(
            ino,
            FileType::from_raw_mode(found.top_stat.st_mode),
            NodeState {
                parent: Some(parent.clone()),
                name: name.to_owned(),
                reals: found.reals,
                detached: None,
            },
        );
        let node = self.inodes.get_or_insert(candidate);
        for (layer, fd) in found.dir_fds {
            self.cache_dir_fd(node.ino, layer, Arc::new(fd));
        }
        let stat = inode::overlay_stat(&node, found.top_stat, self.cfg.static_nlink);
        Entry { node, stat }
    }

    fn lookup_existing(&self, node: Arc<Node>) -> Result<Entry> {
        let stat = self.getattr(&node)?;
        self.inodes.add_lookup(&node);
        Ok(Entry { node, stat })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name(OsStr::new("a")).is_ok());
        assert!(matches!(
            check_name(OsStr::new("")),
            Err(Error::InvalidName)
        ));
        assert!(matches!(
            check_name(OsStr::new("a/b")),
            Err(Error::InvalidName)
        ));
        let long = "x".repeat(256);
        assert!(matches!(
            check_name(OsStr::new(&long)),
            Err(Error::NameTooLong)
        ));
        assert!(check_name(OsStr::new(&long[..255])).is_ok());
    }
}
