//! Lookup across layers (kernel `fs/overlayfs/namei.c`, `ovl_lookup`).
//!
//! A name is searched from the top layer down in every layer where the parent directory has
//! a real copy. The search stops at a whiteout, at a non-directory (it hides everything
//! below), at an opaque directory, and at a non-directory found below a directory.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{FileType, Stat};

use crate::error::{Error, Result};
use crate::ovl::inode::{self, Loc, Node, NodeState, Real};
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
    /// The top object is a metadata-only copy-up; `reals[1]` holds the data.
    pub metacopy: bool,
    /// The top (upper) object records a copy-up origin.
    pub origin: bool,
    /// With `index=on`, a lower hard link whose upper copy is in the index (see
    /// [`NodeState::index_copy`]).
    pub index_copy: Option<Arc<OwnedFd>>,
    /// With `index=on`, a hard link whose link count the index keeps.
    pub indexed: bool,
}

/// What one layer holds at a name.
enum Probe {
    /// Nothing: look further down.
    Missing,
    /// A whiteout: the name does not exist below.
    Whiteout,
    /// An object, with a handle when it is a directory.
    Found(Stat, Option<OwnedFd>),
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

/// What the `overlay.metacopy` mark of a regular file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metacopy {
    /// Not marked: the file holds its own data.
    No,
    /// Marked, and the data was found in a layer below.
    WithData,
    /// Marked, but no layer below holds the data.
    DataMissing,
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
    /// entry. Directory redirects (`overlay.redirect`) are followed as the kernel does by
    /// default (`redirect_always_follow`): a relative one renames the entry in the parent's
    /// lower directories, an absolute one continues from the roots of the layers below.
    pub fn lookup_real(&self, parent: &Node, name: &OsStr) -> Result<Option<Found>> {
        if whiteout::is_reserved_name(name) {
            return Ok(None);
        }
        let mut candidates: Vec<Real> = parent.state().reals.clone();
        let mut target = Loc::Same;
        let mut reals: Vec<Real> = Vec::new();
        let mut top_stat: Option<Stat> = None;
        let mut dir_fds = Vec::new();
        let mut metacopy = false;
        let mut origin = false;
        let mut i = 0;
        while i < candidates.len() {
            let pr = candidates[i].clone();
            i += 1;
            let probe = self.probe_layer(parent, &pr, name, &target)?;
            let (st, dir_fd) = match probe {
                Probe::Missing => continue,
                Probe::Whiteout => break,
                Probe::Found(st, fd) => (st, fd),
            };
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            if top_stat.is_none() {
                top_stat = Some(st);
                if !is_dir {
                    reals.push(Real::at(pr.layer));
                    break;
                }
            } else if !is_dir {
                // A non-directory below a directory ends the stack (kernel: `d.stop`).
                break;
            }
            let fd = dir_fd.ok_or(Error::Internal("directory probe without handle"))?;
            let markers =
                whiteout::dir_markers(fd.as_fd()).map_err(|e| Error::io("read dir markers", e))?;
            reals.push(Real {
                layer: pr.layer,
                xwhiteouts: markers.xwhiteouts,
                impure: markers.impure,
                loc: target.clone(),
            });
            // Redirects matter only with layers left below (kernel: not `d.last`); without
            // redirect_dir=follow the kernel does not guess where the directory came from but
            // refuses the lookup ("refusing to follow redirect").
            let more_below = i < candidates.len() || self.cfg.redirect_dir.follow();
            let redirect = if more_below && !markers.opaque && markers.redirect {
                whiteout::redirect(fd.as_fd()).map_err(|e| Error::io("read redirect", e))?
            } else {
                None
            };
            if redirect.is_some() && !self.cfg.redirect_dir.follow() {
                return Err(Error::io(
                    "lookup",
                    std::io::Error::from_raw_os_error(libc::EPERM),
                ));
            }
            dir_fds.push((pr.layer, fd));
            if markers.opaque {
                break;
            }
            match redirect {
                Some(Loc::Abs(path)) => {
                    // Continue from the roots of every layer below this one.
                    candidates = self
                        .layers
                        .stack()
                        .filter(|l| l.idx > pr.layer)
                        .map(|l| Real::at(l.idx))
                        .collect();
                    i = 0;
                    target = Loc::Abs(path);
                }
                Some(other) => target = other,
                None => {}
            }
        }
        let top_is_upper = reals.first().is_some_and(|r| r.layer.is_upper());
        if let Some(st) = &top_stat {
            let parent_impure = parent
                .state()
                .reals
                .first()
                .is_some_and(|r| r.layer.is_upper() && r.impure);
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            if top_is_upper && is_dir && reals.len() > 1 && !self.origin_known(st.st_ino) {
                self.fix_origin(parent, st, &dir_fds)?;
            }
            if top_is_upper && parent_impure {
                origin = self.upper_has_origin(st.st_ino);
                if !self.origin_known(st.st_ino) {
                    origin = self.resolve_origin(parent, name, st, &mut reals, &dir_fds)?;
                }
            }
            // A metadata-only copy has no data blocks of its own; it is in an impure directory
            // unless it has no origin (a lower hard link copied up without index=on), so the
            // xattr is read for either.
            let dataless = st.st_blocks == 0 && st.st_size > 0;
            let regular = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;
            if top_is_upper && (parent_impure || dataless) && regular {
                // Data gone from below: the upper file is shown as it is rather than fail.
                metacopy = self.resolve_metacopy(parent, name, LayerIdx::UPPER, &mut reals)?
                    == Metacopy::WithData;
            } else if !top_is_upper && regular && self.cfg.metacopy {
                // A lower layer that was once an upper (kernel: metacopy in any layer but the
                // last): its data is further down, and without it there is nothing to read.
                // As in the kernel, a file of any layer but the last may be one.
                let top = reals.first().map(|r| r.layer).unwrap_or(LayerIdx::UPPER);
                if self.layers.stack().any(|l| l.idx > top) {
                    metacopy = match self.resolve_metacopy(parent, name, top, &mut reals)? {
                        Metacopy::No => false,
                        Metacopy::WithData => true,
                        Metacopy::DataMissing => {
                            let eio = std::io::Error::from_raw_os_error(libc::EIO);
                            return Err(Error::io("lookup metacopy data", eio));
                        }
                    };
                }
            }
        }
        let (index_copy, indexed) = match &top_stat {
            Some(st) => self.index_lookup(parent, name, st, &reals)?,
            None => (None, false),
        };
        Ok(top_stat.map(|top_stat| Found {
            metacopy,
            origin,
            index_copy,
            indexed,
            reals,
            top_stat,
            dir_fds,
        }))
    }

    /// An upper object in an impure directory may be a copy-up from an earlier mount: if its
    /// `overlay.origin` names the lower object under the same name, it keeps that object's
    /// inode number (kernel `ovl_check_origin`), and a non-directory gets it as its origin.
    fn resolve_origin(
        &self,
        parent: &Node,
        name: &OsStr,
        st: &Stat,
        reals: &mut Vec<Real>,
        dir_fds: &[(LayerIdx, OwnedFd)],
    ) -> Result<bool> {
        self.mark_origin_checked(st.st_ino);
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        let obj = match dir_fds.iter().find(|(l, _)| l.is_upper()) {
            Some((_, fd)) => fd.try_clone().map_err(|e| Error::io("dup", e))?,
            None => {
                let udir = self.real_dir_fd(parent, LayerIdx::UPPER)?;
                sys::fs::open_path(udir.as_fd(), name).map_err(|e| Error::io("open upper", e))?
            }
        };
        let Some(origin) =
            whiteout::origin(obj.as_fd()).map_err(|e| Error::io("read origin", e))?
        else {
            return Ok(false);
        };
        self.mark_has_origin(st.st_ino);
        if is_dir {
            if let Some((layer, fd)) = dir_fds.iter().find(|(l, _)| !l.is_upper()) {
                let lst = sys::fs::stat_fd(fd.as_fd()).map_err(|e| Error::io("stat origin", e))?;
                self.record_origin(st.st_ino, self.ino_for(*layer, lst.st_ino));
            }
            return Ok(true);
        }
        let lowers = parent.lower_reals();
        for pr in lowers {
            match self.probe_layer(parent, &pr, name, &Loc::Same)? {
                Probe::Missing => continue,
                Probe::Whiteout => break,
                Probe::Found(lst, _) => {
                    let dir = self.real_dir_fd(parent, pr.layer)?;
                    let lobj = sys::fs::open_path(dir.as_fd(), name)
                        .map_err(|e| Error::io("open origin", e))?;
                    let uuid = self.layers.get(pr.layer).map_or([0; 16], |l| l.uuid);
                    if whiteout::encode_origin(lobj.as_fd(), &uuid).as_deref() == Some(&origin[..])
                    {
                        reals.push(Real::at(pr.layer));
                        // A broken hard link must not share the number of the names left
                        // below; an indexed one is still one file with them.
                        if lst.st_nlink == 1 || self.index_for(FileType::RegularFile, 2).is_some() {
                            self.record_origin(st.st_ino, self.ino_for(pr.layer, lst.st_ino));
                        }
                    }
                    break;
                }
            }
        }
        Ok(true)
    }

    /// A merged directory whose upper copy records no origin gets the first lower copy as its
    /// origin, and its parent is marked impure (kernel `ovl_fix_origin`, done at lookup).
    fn fix_origin(&self, parent: &Node, st: &Stat, dir_fds: &[(LayerIdx, OwnedFd)]) -> Result<()> {
        let Ok(upper) = self.upper_ctx() else {
            return Ok(());
        };
        let (Some((_, ufd)), Some((llayer, lfd))) = (
            dir_fds.iter().find(|(l, _)| l.is_upper()),
            dir_fds.iter().find(|(l, _)| !l.is_upper()),
        ) else {
            return Ok(());
        };
        self.mark_origin_checked(st.st_ino);
        if whiteout::origin(ufd.as_fd())
            .map_err(|e| Error::io("read origin", e))?
            .is_some()
        {
            return Ok(());
        }
        let uuid = self.layers.get(*llayer).map_or([0; 16], |l| l.uuid);
        let Some(fh) = upper.origin_value(lfd.as_fd(), &uuid) else {
            return Ok(());
        };
        crate::ovl::vfs::do_setxattr(ufd.as_fd(), &upper.xattr("origin"), &fh, 0)?;
        let pfd = self.real_dir_fd(parent, LayerIdx::UPPER)?;
        self.set_impure(parent, pfd.as_fd())
    }

    /// An upper regular file marked `overlay.metacopy` holds only attributes: its data is the
    /// lower file its redirect names (or the one under the same name). Says whether it is
    /// one, with `reals` set to `[upper, data]` when the data was found.
    fn resolve_metacopy(
        &self,
        parent: &Node,
        name: &OsStr,
        top: LayerIdx,
        reals: &mut Vec<Real>,
    ) -> Result<Metacopy> {
        let udir = self.real_dir_fd(parent, top)?;
        if !whiteout::is_metacopy_entry(udir.as_fd(), name)
            .map_err(|e| Error::io("read metacopy", e))?
        {
            return Ok(Metacopy::No);
        }
        let obj = sys::fs::open_path(udir.as_fd(), name).map_err(|e| Error::io("open upper", e))?;
        let target = match self.cfg.redirect_dir.follow() {
            true => whiteout::redirect(obj.as_fd()).map_err(|e| Error::io("read redirect", e))?,
            false => None,
        }
        .unwrap_or(Loc::Same);
        let candidates: Vec<Real> = match &target {
            Loc::Abs(_) => self
                .layers
                .stack()
                .filter(|l| l.idx > top)
                .map(|l| Real::at(l.idx))
                .collect(),
            _ => parent
                .state()
                .reals
                .iter()
                .filter(|r| r.layer > top)
                .cloned()
                .collect(),
        };
        for pr in candidates {
            match self.probe_layer(parent, &pr, name, &target)? {
                Probe::Missing => continue,
                Probe::Whiteout => break,
                Probe::Found(st, _) => {
                    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                        break;
                    }
                    reals.truncate(1);
                    reals.push(Real {
                        loc: target.clone(),
                        ..Real::at(pr.layer)
                    });
                    return Ok(Metacopy::WithData);
                }
            }
        }
        Ok(Metacopy::DataMissing)
    }

    /// Looks for the entry in one layer: at `name` (or the redirected name) under the parent's
    /// real directory, or at an absolute path from the layer root.
    fn probe_layer(&self, parent: &Node, pr: &Real, name: &OsStr, target: &Loc) -> Result<Probe> {
        let (dir, leaf): (Arc<OwnedFd>, OsString) = match target {
            Loc::Same => {
                let dir = self.real_dir_fd(parent, pr.layer)?;
                let known = self.lower_names.as_ref();
                if known.and_then(|n| n.may_hold(parent.ino, pr.layer, &dir, name)) == Some(false) {
                    return Ok(Probe::Missing);
                }
                (dir, name.to_owned())
            }
            Loc::Renamed(n) => (self.real_dir_fd(parent, pr.layer)?, n.clone()),
            Loc::Abs(path) => {
                let root = self
                    .layers
                    .root(pr.layer)
                    .ok_or(Error::Internal("unknown layer"))?;
                let (dir_path, leaf) = match (path.parent(), path.file_name()) {
                    (Some(d), Some(l)) => (d, l.to_owned()),
                    _ => return Ok(Probe::Missing),
                };
                let dir = if dir_path.as_os_str().is_empty() {
                    sys::fs::open_dir_path(root, OsStr::new("."))
                } else {
                    sys::fs::open_dir_path(root, dir_path.as_os_str())
                };
                match dir {
                    Ok(d) => (Arc::new(d), leaf),
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                        ) =>
                    {
                        return Ok(Probe::Missing);
                    }
                    Err(e) => return Err(Error::io("lookup redirect", e)),
                }
            }
        };
        let st = match sys::fs::stat_name(dir.as_fd(), &leaf) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let wh = whiteout::has_wh_file(dir.as_fd(), &leaf)
                    .map_err(|e| Error::io("look for .wh. whiteout", e))?;
                return Ok(if wh { Probe::Whiteout } else { Probe::Missing });
            }
            Err(e) => return Err(Error::io("lookup", e)),
        };
        if whiteout::is_chardev_whiteout(&st)
            || (pr.xwhiteouts
                && whiteout::may_be_xattr_whiteout(&st)
                && whiteout::is_xattr_whiteout(dir.as_fd(), &leaf)
                    .map_err(|e| Error::io("read xattr whiteout", e))?)
        {
            return Ok(Probe::Whiteout);
        }
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let fd = sys::fs::open_dir_path(dir.as_fd(), &leaf)
                .map_err(|e| Error::io("open real directory", e))?;
            return Ok(Probe::Found(st, Some(fd)));
        }
        Ok(Probe::Found(st, None))
    }

    /// Turns a search result into a node (new, or the one already known under the same inode
    /// number) and its attributes.
    fn install(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> Entry {
        let ino = self.ino_for(found.reals[0].layer, found.top_stat.st_ino);
        let state = NodeState {
            parent: Some(parent.clone()),
            name: name.to_owned(),
            reals: found.reals,
            detached: None,
            metacopy: found.metacopy,
            origin: found.origin,
            index_copy: found.index_copy.clone(),
            indexed: found.indexed,
        };
        let candidate = Node::new(
            ino,
            FileType::from_raw_mode(found.top_stat.st_mode),
            state.clone(),
        );
        let node = self.inodes.get_or_insert(candidate);
        if !node.is_dir() {
            let mut st = node.state_mut();
            if st.detached.is_some() {
                // Found again under another name (the other name of an indexed hard link,
                // say): that name and what was found there locate it from now on; its old
                // layers may have no directory where this name is.
                *st = state;
            }
        }
        for (layer, fd) in found.dir_fds {
            self.cache_dir_fd(node.ino, layer, Arc::new(fd));
        }
        let stat = match node.state().indexed {
            // The link count and (before link-up) the attributes are the index's.
            true => self.getattr(&node).unwrap_or(found.top_stat),
            false => self.with_override(&node, found.top_stat),
        };
        let stat = inode::overlay_stat(&node, stat, self.cfg.static_nlink);
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
