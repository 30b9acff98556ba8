//! rename(2) with `RENAME_NOREPLACE` and `RENAME_EXCHANGE` (kernel `ovl_rename` in
//! `fs/overlayfs/dir.c`).
//!
//! Non-directories are copied up and renamed in the upper layer; when a lower layer still has
//! the old name, a whiteout takes its place atomically (`RENAME_WHITEOUT`, or an exchange with
//! a whiteout prepared in the workdir). Directories that exist only in the upper layer move
//! freely (and become opaque when they land in a merged directory). Directories with lower
//! copies are copied up (metadata only) and get the kernel's `redirect_dir=on` xattr, so
//! kernel overlayfs mounting the same upper sees the same tree; with `redirect_dir=off` or
//! `follow` they give `EXDEV` as with the kernel's default.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustix::fs::FileType;

use crate::error::{Error, Result};
use crate::ovl::copy_up::{RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT};
use crate::ovl::inode::{Loc, Node, Real};
use crate::ovl::layer::LayerIdx;
use crate::ovl::namei::{Found, check_name};
use crate::ovl::{Overlay, vfs, whiteout};
use crate::sys;

fn errno(op: &'static str, e: i32) -> Error {
    Error::io(op, std::io::Error::from_raw_os_error(e))
}

fn is_dir(found: &Found) -> bool {
    FileType::from_raw_mode(found.top_stat.st_mode) == FileType::Directory
}

/// A directory that only the upper layer has (or an opaque one): it can move without a
/// redirect.
fn movable(found: &Found) -> bool {
    !is_dir(found) || (found.reals.len() == 1 && found.reals[0].layer.is_upper())
}

impl Overlay {
    /// Renames `name` in `parent` to `newname` in `newparent`.
    pub fn rename(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        if whiteout::is_reserved_name(newname) {
            return Err(Error::InvalidName);
        }
        if flags & RENAME_WHITEOUT != 0 || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            // Kernel overlayfs refuses RENAME_WHITEOUT from users too.
            return Err(errno("rename", libc::EINVAL));
        }
        self.want_write()?;
        let exchange = flags & RENAME_EXCHANGE != 0;
        let src = self.lookup_real(parent, name)?.ok_or(Error::NotFound)?;
        let dst = self.lookup_real(newparent, newname)?;
        if exchange && dst.is_none() {
            return Err(Error::NotFound);
        }
        if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(errno("rename", libc::EEXIST));
        }
        let src_ino = self.ino_for(src.reals[0].layer, src.top_stat.st_ino);
        if let Some(d) = &dst {
            if self.ino_for(d.reals[0].layer, d.top_stat.st_ino) == src_ino {
                // Two names of one object: POSIX says do nothing.
                return Ok(());
            }
            if !exchange {
                if is_dir(&src) && !is_dir(d) {
                    return Err(Error::NotDir);
                }
                if !is_dir(&src) && is_dir(d) {
                    return Err(errno("rename", libc::EISDIR));
                }
            }
        }
        let needs_redirect =
            !movable(&src) || (exchange && dst.as_ref().is_some_and(|d| !movable(d)));
        if needs_redirect && !self.cfg.redirect_dir.create() {
            // The kernel's answer without redirect_dir=on; `mv` then copies.
            return Err(errno("rename", libc::EXDEV));
        }
        if let (Some(d), false) = (&dst, exchange) {
            if is_dir(d) && !self.dir_is_empty(newparent, newname, d)? {
                return Err(errno("rename", libc::ENOTEMPTY));
            }
        }

        self.copy_up(parent)?;
        self.copy_up(newparent)?;
        // Names of indexed lower hard links get their upper alias first (index=on).
        let src = self.prepare_indexed_name(parent, name, src)?;
        let dst = match dst {
            Some(d) => Some(self.prepare_indexed_name(newparent, newname, d)?),
            None => None,
        };
        let src_node = self.lookup(parent, name)?.node;
        let dst_node = match &dst {
            Some(_) => Some(self.lookup(newparent, newname)?.node),
            None => None,
        };
        let do_rename = || {
            self.rename_upper(
                parent,
                name,
                newparent,
                newname,
                &src,
                dst.as_ref(),
                &src_node,
                dst_node.as_ref(),
                exchange,
            )
        };
        let res = match (&dst, exchange) {
            // The replaced name of an indexed hard link leaves, as in an unlink.
            (Some(d), false) => self.unlink_indexed(newparent, newname, d, do_rename),
            _ => do_rename(),
        };
        self.forget(src_node.ino, 1);
        if let Some(d) = &dst_node {
            self.forget(d.ino, 1);
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_upper(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        src: &Found,
        dst: Option<&Found>,
        src_node: &Arc<Node>,
        dst_node: Option<&Arc<Node>>,
        exchange: bool,
    ) -> Result<()> {
        self.copy_up(src_node)?;
        if let (Some(d), true) = (dst_node, exchange) {
            self.copy_up(d)?;
        }
        let upper = self.upper_ctx()?;
        let odir = self.real_dir_fd(parent, LayerIdx::UPPER)?;
        let ndir = self.real_dir_fd(newparent, LayerIdx::UPPER)?;
        let src_needs_wh = self.lower_positive(parent, name)?;
        // A directory moving into a merged directory becomes opaque, so that whatever a
        // lower layer has (or will have) under its new name never merges into it (kernel
        // ovl_rename: `ovl_type_merge(new->d_parent)`).
        let into_merged = newparent.is_merged_dir();
        let back_into_merged = parent.is_merged_dir();
        let samedir = parent.ino == newparent.ino;
        // A directory with lower copies keeps them through a redirect; one without becomes
        // opaque when it lands in a merged directory.
        let src_redirect = (is_dir(src) && !movable(src)) || src_node.state().metacopy;
        if src_redirect {
            self.set_redirect(src_node, samedir)?;
        } else if is_dir(src) && into_merged {
            self.set_opaque_existing(src_node)?;
        }

        if exchange {
            if let (Some(d), Some(dn)) = (dst, dst_node) {
                if (is_dir(d) && !movable(d)) || dn.state().metacopy {
                    self.set_redirect(dn, samedir)?;
                } else if is_dir(d) && back_into_merged {
                    self.set_opaque_existing(dn)?;
                }
            }
            let dn = dst_node.ok_or(Error::Internal("exchange without target"))?;
            if !samedir {
                // Moved entries with an origin make their new parent impure (kernel
                // ovl_rename), before the move: a crash in between must not leave an entry
                // with an origin (or a metacopy) in a parent nobody looks into.
                if src_node.has_origin() {
                    self.set_impure(newparent, ndir.as_fd())?;
                }
                if dn.has_origin() {
                    self.set_impure(parent, odir.as_fd())?;
                }
            }
            vfs::do_rename(odir.as_fd(), name, ndir.as_fd(), newname, RENAME_EXCHANGE)?;
            // The names the caller gave, not the nodes' cached ones: a hard-linked node may
            // be cached under another of its names.
            set_name(src_node, Some(newparent.clone()), newname.to_owned());
            set_name(dn, Some(parent.clone()), name.to_owned());
            return Ok(());
        }
        if !samedir && src_node.has_origin() {
            self.set_impure(newparent, ndir.as_fd())?;
        }

        let dst_in_upper = match sys::fs::stat_name(ndir.as_fd(), newname) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
            Err(e) => return Err(Error::io("rename stat target", e)),
        };
        if let Some(dn) = dst_node {
            if dst_in_upper && !dn.is_dir() {
                if let Ok(fd) = sys::fs::open_path(ndir.as_fd(), newname) {
                    dn.state_mut().detached = Some(Arc::new(fd));
                }
            }
        }
        let dst_is_upper_dir = dst.is_some_and(|d| is_dir(d) && d.reals[0].layer.is_upper());
        let wh_files = upper.wh_files.load(Ordering::Relaxed);
        if dst_in_upper && (dst_is_upper_dir || !src_needs_wh || wh_files) {
            // Swap, then deal with what landed at the old name: a whiteout if a lower layer
            // has that name, else nothing (a replaced directory may hold whiteouts: it leaves
            // through the workdir).
            vfs::do_rename(odir.as_fd(), name, ndir.as_fd(), newname, RENAME_EXCHANGE)?;
            if src_needs_wh {
                self.whiteout_over(odir.as_fd(), name, true)?;
            } else {
                self.remove_upper_dir(odir.as_fd(), name)?;
            }
        } else if src_needs_wh && !wh_files {
            // Atomic move-and-whiteout; replaces a non-directory target.
            match vfs::do_rename(odir.as_fd(), name, ndir.as_fd(), newname, RENAME_WHITEOUT) {
                Ok(()) => {}
                Err(e) if matches!(e.errno(), libc::EPERM | libc::EINVAL) => {
                    vfs::do_rename(odir.as_fd(), name, ndir.as_fd(), newname, 0)?;
                    self.whiteout_over(odir.as_fd(), name, false)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            vfs::do_rename(odir.as_fd(), name, ndir.as_fd(), newname, 0)?;
            if src_needs_wh {
                self.whiteout_over(odir.as_fd(), name, false)?;
            }
        }
        // A .wh. file for the new name would now sit beside the object: remove it.
        whiteout::remove_wh_file(ndir.as_fd(), newname)
            .map_err(|e| Error::io("unlink .wh. file", e))?;
        if let Some(dn) = dst_node {
            let gone = match dn.state().detached.as_ref() {
                Some(fd) => sys::fs::stat_fd(fd.as_fd())
                    .map(|s| s.st_nlink == 0)
                    .unwrap_or(true),
                None => true,
            };
            if gone || dn.is_dir() {
                dn.dead.store(true, Ordering::Relaxed);
            }
            if dn.is_dir() {
                self.forget_dir_fds(dn.ino, &dn.state().reals.clone());
            }
        }
        set_name(src_node, Some(newparent.clone()), newname.to_owned());
        Ok(())
    }

    /// Writes the redirect that keeps the lower copies of directory `node` reachable after it
    /// moves (kernel `ovl_set_redirect`): its old name when it stays in the same directory and
    /// was never redirected, else its absolute path in the top lower layer. The node's lower
    /// copies are then located by path.
    pub(crate) fn set_redirect(&self, node: &Arc<Node>, samedir: bool) -> Result<()> {
        let upper = self.upper_ctx()?;
        let lowers = node.lower_reals();
        let Some(first) = lowers.first() else {
            return Ok(());
        };
        // The name the lower copies have in the (unchanged) parent, if all agree on one.
        let current = node.parent_and_name().1;
        let lower_name = |r: &Real| match &r.loc {
            Loc::Same => Some(current.clone()),
            Loc::Renamed(x) => Some(x.clone()),
            Loc::Abs(_) => None,
        };
        let names: Vec<Option<std::ffi::OsString>> = lowers.iter().map(lower_name).collect();
        // A lower hard link's redirect must hold from every name: always absolute.
        let hardlink = !node.is_dir()
            && self
                .real_parent(node, first.layer)
                .ok()
                .and_then(|(d, n)| crate::sys::fs::stat_name(d.as_fd(), &n).ok())
                .is_some_and(|s| s.st_nlink > 1);
        let samedir = samedir && !hardlink;
        let relative = match (&names[0], samedir) {
            (Some(n), true) => names
                .iter()
                .all(|x| x.as_ref() == Some(n))
                .then(|| n.clone()),
            _ => None,
        };
        let (value, new_locs): (Vec<u8>, Vec<(LayerIdx, Loc)>) = match relative {
            Some(n) => (
                n.as_bytes().to_vec(),
                lowers
                    .iter()
                    .map(|r| (r.layer, Loc::Renamed(n.clone())))
                    .collect(),
            ),
            None => {
                let mut v = b"/".to_vec();
                v.extend_from_slice(self.real_path(node, first.layer).as_os_str().as_bytes());
                (
                    v,
                    lowers
                        .iter()
                        .map(|r| (r.layer, Loc::Abs(self.real_path(node, r.layer))))
                        .collect(),
                )
            }
        };
        let fd = self.real_path_fd(node)?;
        vfs::do_setxattr(
            fd.as_fd(),
            OsStr::new(&format!("{}redirect", upper.xattr_prefix)),
            &value,
            0,
        )?;
        let mut st = node.state_mut();
        for r in st.reals.iter_mut() {
            if let Some((_, loc)) = new_locs.iter().find(|(l, _)| *l == r.layer) {
                r.loc = loc.clone();
            }
        }
        Ok(())
    }

    /// Makes the upper copy of directory `node` opaque and drops its lower layers.
    fn set_opaque_existing(&self, node: &Arc<Node>) -> Result<()> {
        let upper = self.upper_ctx()?;
        let fd = self.real_dir_fd(node, LayerIdx::UPPER)?;
        vfs::do_setxattr(fd.as_fd(), &upper.opaque_xattr(), b"y", 0)?;
        node.state_mut().reals.retain(|r: &Real| r.layer.is_upper());
        Ok(())
    }

    /// Whether the merged directory `name` in `parent` (found as `found`) has no entries.
    fn dir_is_empty(&self, parent: &Arc<Node>, name: &OsStr, found: &Found) -> Result<bool> {
        let probe = Node::new(
            self.ino_for(found.reals[0].layer, found.top_stat.st_ino),
            FileType::Directory,
            crate::ovl::inode::NodeState::new(
                Some(parent.clone()),
                name.to_owned(),
                found.reals.clone(),
            ),
        );
        Ok(self.read_merged(&probe)?.len() <= 2)
    }
}

fn set_name(node: &Node, parent: Option<Arc<Node>>, name: std::ffi::OsString) {
    let mut st = node.state_mut();
    st.parent = parent;
    st.name = name;
}
