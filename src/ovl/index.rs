//! The inode index (`index=on`; kernel `ovl_lookup_index`, `ovl_create_index`,
//! `ovl_set_nlink_upper`, `ovl_get_nlink`).
//!
//! Without it, copying up one name of a lower hard link breaks the link: the other names
//! keep showing the lower file. With it, the upper copy is also linked into
//! `workdir/index` under the hex of its origin file handle; a lookup of any other name of
//! the lower file finds it there and shows it, and the first change through that name links
//! the index entry into place ("link-up") instead of copying again. The overlay's link count
//! of such a file is kept in its `overlay.nlink` xattr relative to the upper inode's own
//! (`U+N` / `U-N`; the kernel also reads `L+N`, relative to the lower file), so links and
//! unlinks that change both by one leave it alone. On-disk format as the kernel's, so either
//! can mount what the other wrote with `index=on`.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{FileType, Stat};

use crate::error::{Error, Result};
use crate::ovl::inode::{Loc, Node, Real};
use crate::ovl::layer::LayerIdx;
use crate::ovl::namei::Found;
use crate::ovl::{Overlay, vfs, whiteout};
use crate::sys;

/// Offset of the flags byte in the kernel's `struct ovl_fb` (version, magic, length, flags).
const FH_FLAGS: usize = 3;
/// `OVL_FH_FLAG_PATH_UPPER`: the handle names an upper object.
const FH_FLAG_PATH_UPPER: u8 = 1 << 2;

/// Name of the index entry for an object with origin file handle `fh` (its hex digits).
pub fn entry_name(fh: &[u8]) -> OsString {
    fh.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

/// Parses an `overlay.nlink` value: the base (`U`pper or `L`ower link count) and the
/// difference to add.
fn parse_nlink(value: &[u8]) -> Option<(u8, i64)> {
    let text = std::str::from_utf8(value).ok()?.trim_end_matches('\0');
    let (base, rest) = text.split_at_checked(1)?;
    let base = match base {
        "U" => b'U',
        "L" => b'L',
        _ => return None,
    };
    Some((base, rest.parse().ok()?))
}

impl Overlay {
    /// At mount with `index=on`: ties the upper layer to its lowers and the index to its
    /// upper layer the way the kernel does (`overlay.origin` on the upper root naming the
    /// top lower root, `overlay.upper` on the index naming the upper root), when not done
    /// yet, so that kernel overlayfs accepts the pair with `index=on`.
    pub(crate) fn init_index(&self) -> Result<()> {
        let Some(index) = self.upper_ctx().ok().and_then(|u| u.index.clone()) else {
            return Ok(());
        };
        let upper = self.upper_ctx()?;
        let (Some(up), Some(top)) = (self.layers.upper(), self.layers.stack().nth(1)) else {
            return Ok(());
        };
        let marks = [
            (up.root.as_fd(), "origin", top.root.as_fd(), top.uuid),
            (
                index.as_fd(),
                "upper",
                up.root.as_fd(),
                sys::fs::fs_uuid(up.root.as_fd()),
            ),
        ];
        for (holder, xattr, named, uuid) in marks {
            let name = upper.xattr(xattr);
            if sys::fs::get_xattr(holder, &name).is_ok_and(|v| v.is_some()) {
                continue;
            }
            if let Some(mut fh) = whiteout::encode_origin(named, &uuid) {
                if xattr == "upper" {
                    fh[FH_FLAGS] |= FH_FLAG_PATH_UPPER;
                }
                vfs::do_setxattr(holder, &name, &fh, 0)?;
            }
        }
        Ok(())
    }

    /// `workdir/index` when `index=on` applies to a non-directory of type `file_type` with
    /// `nlink` links: only regular files with more than one link are indexed (kernel
    /// `ovl_need_index` without `nfs_export`).
    pub(crate) fn index_for(&self, file_type: FileType, nlink: u64) -> Option<Arc<OwnedFd>> {
        let upper = self.upper_ctx().ok()?;
        // Entries are named by file handles (the kernel turns the index off without them).
        match file_type == FileType::RegularFile && nlink > 1 && upper.origin_handles() {
            true => upper.index.clone(),
            false => None,
        }
    }

    /// At lookup of `name` in `parent`, whose top object is `st` in `reals[0]`: the index
    /// copy of a lower hard link (if one of its names was copied up), and whether the object
    /// is an indexed hard link at all.
    pub(crate) fn index_lookup(
        &self,
        parent: &Node,
        name: &OsStr,
        st: &Stat,
        reals: &[Real],
    ) -> Result<(Option<Arc<OwnedFd>>, bool)> {
        let Some(top) = reals.first() else {
            return Ok((None, false));
        };
        let file_type = FileType::from_raw_mode(st.st_mode);
        let Some(index) = self.index_for(file_type, st.st_nlink) else {
            return Ok((None, false));
        };
        if top.layer.is_upper() {
            // An upper name of an indexed file: its link count is in its nlink xattr.
            return Ok((None, true));
        }
        if top.loc != Loc::Same {
            return Ok((None, false));
        }
        let dir = self.real_dir_fd(parent, top.layer)?;
        let obj = sys::fs::open_path(dir.as_fd(), name).map_err(|e| Error::io("open lower", e))?;
        match self.open_index_entry(&index, top.layer, obj.as_fd())? {
            Some(copy) => {
                self.complete_index_copy(copy.as_fd(), dir.as_fd(), name)?;
                Ok((Some(Arc::new(copy)), true))
            }
            None => Ok((None, false)),
        }
    }

    /// Kernel overlayfs with `metacopy=on` leaves index copies without data (the data stays
    /// in the lower file until the first write); such a copy gets its data here, before any
    /// name reads through it (kernel `ovl_copy_up_meta_inode_data`, done early).
    fn complete_index_copy(
        &self,
        copy: BorrowedFd<'_>,
        lower_dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<()> {
        if !whiteout::is_metacopy(copy).map_err(|e| Error::io("read metacopy", e))? {
            return Ok(());
        }
        let upper = self.upper_ctx()?;
        let src = sys::fs::open_beneath(lower_dir, name, rustix::fs::OFlags::RDONLY)
            .map_err(|e| Error::io("open lower data", e))?;
        let size = sys::fs::stat_fd(src.as_fd())
            .map_err(|e| Error::io("stat", e))?
            .st_size;
        let dst = sys::fs::reopen(copy, rustix::fs::OFlags::WRONLY)
            .map_err(|e| Error::io("open index copy", e))?;
        sys::fs::copy_data(
            src.as_fd(),
            dst.as_fd(),
            size as u64,
            self.copy_durability(),
        )
        .map_err(|e| Error::io("copy-up data", e))?;
        match vfs::do_removexattr(copy, &upper.xattr("metacopy")) {
            Err(e) if e.errno() != libc::ENODATA => Err(e),
            _ => Ok(()),
        }
    }

    /// The index entry of lower object `obj` of layer `layer`, if there is one.
    fn open_index_entry(
        &self,
        index: &OwnedFd,
        layer: LayerIdx,
        obj: BorrowedFd<'_>,
    ) -> Result<Option<OwnedFd>> {
        let uuid = self.layers.get(layer).map_or([0; 16], |l| l.uuid);
        let Some(fh) = whiteout::encode_origin(obj, &uuid) else {
            return Ok(None);
        };
        match sys::fs::open_path(index.as_fd(), &entry_name(&fh)) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(Error::io("open index entry", e)),
        }
    }

    /// The index entry behind the name `found` describes (an upper name through its origin,
    /// a lower one through its file handle), with its name in the index.
    pub(crate) fn index_entry_of(
        &self,
        parent: &Node,
        name: &OsStr,
        found: &Found,
    ) -> Result<Option<(OwnedFd, OsString)>> {
        let file_type = FileType::from_raw_mode(found.top_stat.st_mode);
        let Some(index) = self.index_for(file_type, found.top_stat.st_nlink) else {
            return Ok(None);
        };
        let top = found.reals[0].clone();
        let dir = self.real_dir_fd(parent, top.layer)?;
        let obj = sys::fs::open_path(dir.as_fd(), name).map_err(|e| Error::io("open", e))?;
        let fh = match top.layer.is_upper() {
            true => whiteout::origin(obj.as_fd()).map_err(|e| Error::io("read origin", e))?,
            false => {
                let uuid = self.layers.get(top.layer).map_or([0; 16], |l| l.uuid);
                whiteout::encode_origin(obj.as_fd(), &uuid)
            }
        };
        let Some(fh) = fh else {
            return Ok(None);
        };
        let entry = entry_name(&fh);
        match sys::fs::open_path(index.as_fd(), &entry) {
            Ok(fd) => Ok(Some((fd, entry))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(Error::io("open index entry", e)),
        }
    }

    /// With `index=on`, before a name of a lower hard link is removed, renamed or replaced:
    /// the file gets its index copy (copied up through any of its names if it has none yet)
    /// and this name its upper alias, so that the link count can be kept (kernel
    /// `ovl_nlink_start`). Returns what the name shows afterwards.
    pub(crate) fn prepare_indexed_name(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: Found,
    ) -> Result<Found> {
        let file_type = FileType::from_raw_mode(found.top_stat.st_mode);
        if found.reals[0].layer.is_upper()
            || self.index_for(file_type, found.top_stat.st_nlink).is_none()
        {
            return Ok(found);
        }
        if self.index_entry_of(parent, name, &found)?.is_none() {
            let node = self.lookup(parent, name)?.node;
            let copied = self.copy_up(&node);
            self.forget(node.ino, 1);
            copied?;
        }
        let found = self.lookup_real(parent, name)?.ok_or(Error::NotFound)?;
        if self.link_up_name(parent, name, &found)? {
            return self.lookup_real(parent, name)?.ok_or(Error::NotFound);
        }
        Ok(found)
    }

    /// With `index=on`: gives the lower name `name` in `parent` of an indexed hard link its
    /// upper alias (a link to the index copy), so that it can be renamed or replaced like
    /// any upper name (kernel `ovl_nlink_start` copying up first). Returns whether it did.
    pub(crate) fn link_up_name(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: &Found,
    ) -> Result<bool> {
        if found.reals[0].layer.is_upper() {
            return Ok(false);
        }
        let Some((entry_fd, entry)) = self.index_entry_of(parent, name, found)? else {
            return Ok(false);
        };
        self.copy_up(parent)?;
        let index = self
            .upper_ctx()?
            .index
            .clone()
            .ok_or(Error::Internal("index entry without index"))?;
        let udir = self.real_dir_fd(parent, LayerIdx::UPPER)?;
        let st = sys::fs::stat_fd(entry_fd.as_fd()).map_err(|e| Error::io("stat", e))?;
        let nlink = self.indexed_nlink(entry_fd.as_fd(), st.st_nlink, found.top_stat.st_nlink)?;
        vfs::do_link(index.as_fd(), &entry, udir.as_fd(), name)?;
        self.set_impure(parent, udir.as_fd())?;
        self.store_nlink(entry_fd.as_fd(), nlink)?;
        Ok(true)
    }

    /// The overlay link count of indexed object `obj` (upper or index entry) with real link
    /// count `upper_nlink`; `lower_nlink` for values relative to the lower file.
    pub(crate) fn indexed_nlink(
        &self,
        obj: BorrowedFd<'_>,
        upper_nlink: u64,
        lower_nlink: u64,
    ) -> Result<u64> {
        let upper = self.upper_ctx()?;
        let value =
            sys::fs::get_xattr(obj, &upper.xattr("nlink")).map_err(|e| Error::io("nlink", e))?;
        let Some((base, diff)) = value.as_deref().and_then(parse_nlink) else {
            return Ok(upper_nlink);
        };
        let base = if base == b'U' {
            upper_nlink
        } else {
            lower_nlink
        };
        Ok((base as i64 + diff).max(0) as u64)
    }

    /// Records `nlink` as the overlay link count of indexed object `obj`, relative to its
    /// current real link count.
    pub(crate) fn store_nlink(&self, obj: BorrowedFd<'_>, nlink: u64) -> Result<()> {
        let upper = self.upper_ctx()?;
        let real = sys::fs::stat_fd(obj)
            .map_err(|e| Error::io("stat", e))?
            .st_nlink;
        let value = format!("U{:+}", nlink as i64 - real as i64);
        vfs::do_setxattr(obj, &upper.xattr("nlink"), value.as_bytes(), 0)
    }

    /// Removes one name of an indexed hard link (`remove` does the removal): the overlay link
    /// count drops by one, and with the last name the index entry goes too (kernel
    /// `ovl_nlink_start`/`ovl_nlink_end`, `ovl_cleanup_index`).
    pub(crate) fn unlink_indexed(
        &self,
        parent: &Node,
        name: &OsStr,
        found: &Found,
        remove: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let Some((entry, entry_name)) = self.index_entry_of(parent, name, found)? else {
            return remove();
        };
        let real = sys::fs::stat_fd(entry.as_fd()).map_err(|e| Error::io("stat", e))?;
        let lower_nlink = match found.reals.iter().find(|r| !r.layer.is_upper()) {
            Some(_) if !found.reals[0].layer.is_upper() => found.top_stat.st_nlink,
            _ => real.st_nlink,
        };
        let before = self.indexed_nlink(entry.as_fd(), real.st_nlink, lower_nlink)?;
        remove()?;
        let index = self
            .upper_ctx()?
            .index
            .clone()
            .ok_or(Error::Internal("index entry without index"))?;
        if before <= 1 {
            vfs::do_unlink(index.as_fd(), &entry_name)
        } else {
            self.store_nlink(entry.as_fd(), before - 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nlink_values_as_the_kernel_writes_them() {
        assert_eq!(parse_nlink(b"U+0"), Some((b'U', 0)));
        assert_eq!(parse_nlink(b"U-1"), Some((b'U', -1)));
        assert_eq!(parse_nlink(b"L+2"), Some((b'L', 2)));
        assert_eq!(parse_nlink(b"X+2"), None);
        assert_eq!(parse_nlink(b""), None);
        assert_eq!(entry_name(&[0x00, 0xfb, 0x1d]), OsString::from("00fb1d"));
    }
}
