//! Owners and modes kept in an extended attribute instead of the inode: fuse-overlayfs's
//! `xattr_permissions=1|2` and its `override_stat` attributes.
//!
//! Why: rootless containers-storage with `force_mask` (and stores prepared by fuse-overlayfs)
//! cannot give files the owners and modes the image wants, because the ids are not mapped in
//! its user namespace or the mask must stay on disk. The real owner and mode then stay what
//! they are, and `UID:GID:OCTAL_MODE` in one of three attributes says what the merged view
//! shows. A layer uses the attribute its root directory carries (the upper layer the one
//! `xattr_permissions=` names); only directories and regular files are overridden, as in
//! fuse-overlayfs. The attribute holds ids as the layers store them (before `uidmapping=`).

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use rustix::fs::{FileType, Stat};

use std::os::fd::AsFd;

use crate::error::Result;
use crate::ovl::Overlay;
use crate::ovl::inode::Node;
use crate::ovl::vfs;
use crate::sys;

/// Which attribute a layer keeps owners in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideXattr {
    /// `security.fuseoverlayfs.override_stat` (`xattr_permissions=1`; needs privilege).
    Privileged,
    /// `user.containers.override_stat` (`xattr_permissions=2`; what containers-storage writes).
    Containers,
    /// `user.fuseoverlayfs.override_stat` (older fuse-overlayfs stores).
    User,
}

impl OverrideXattr {
    /// In the order fuse-overlayfs looks for them on a layer root.
    const ALL: [OverrideXattr; 3] = [Self::Privileged, Self::Containers, Self::User];

    /// The attribute's name.
    pub fn name(self) -> &'static OsStr {
        OsStr::new(match self {
            Self::Privileged => "security.fuseoverlayfs.override_stat",
            Self::Containers => "user.containers.override_stat",
            Self::User => "user.fuseoverlayfs.override_stat",
        })
    }

    /// The attribute `xattr_permissions=N` selects for the upper layer.
    pub fn from_option(n: u8) -> Option<OverrideXattr> {
        match n {
            1 => Some(Self::Privileged),
            2 => Some(Self::Containers),
            _ => None,
        }
    }

    /// The attribute a layer's root directory carries, if any.
    pub fn detect(root: BorrowedFd<'_>) -> Option<OverrideXattr> {
        Self::ALL
            .into_iter()
            .find(|x| matches!(sys::fs::get_xattr(root, x.name()), Ok(Some(_))))
    }
}

/// Whether `name` is one of the override attributes (hidden from the merged view when a layer
/// uses them).
pub fn is_override_name(name: &[u8]) -> bool {
    OverrideXattr::ALL
        .iter()
        .any(|x| x.name().as_encoded_bytes() == name)
}

/// What an override attribute says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owner, as the layers store ids.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits with set-id and sticky bits.
    pub mode: u32,
}

impl Owner {
    /// The owner and mode `st` has on disk.
    pub fn of(st: &Stat) -> Owner {
        Owner {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }

    /// Parses `UID:GID:OCTAL_MODE[:TYPE]` (the type, which fuse-overlayfs 2 may add, is not
    /// needed: only directories and regular files are overridden).
    pub fn parse(value: &[u8]) -> Option<Owner> {
        let text = std::str::from_utf8(value).ok()?;
        let mut f = text.trim_end_matches('\0').split(':');
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let mode = u32::from_str_radix(f.next()?, 8).ok()?;
        Some(Owner {
            uid,
            gid,
            mode: mode & 0o7777,
        })
    }

    /// The attribute value, as fuse-overlayfs writes it.
    pub fn format(self) -> String {
        format!("{}:{}:{:o}", self.uid, self.gid, self.mode)
    }

    /// `st` with this owner and mode.
    pub fn apply(self, st: &mut Stat) {
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        st.st_mode = (st.st_mode & !0o7777) | self.mode;
    }
}

/// Whether overrides apply to an object of this kind (fuse-overlayfs: directories and
/// regular files only).
pub fn applies_to(st: &Stat) -> bool {
    matches!(
        FileType::from_raw_mode(st.st_mode),
        FileType::Directory | FileType::RegularFile
    )
}

/// The override of the object behind `obj`; `None` when it has none (or an unreadable one:
/// the real attributes show then).
pub fn read(obj: BorrowedFd<'_>, which: OverrideXattr) -> Option<Owner> {
    match sys::fs::get_xattr(obj, which.name()) {
        Ok(Some(v)) => Owner::parse(&v),
        _ => None,
    }
}

/// Records `owner` for the object behind `obj`.
pub fn write(obj: BorrowedFd<'_>, which: OverrideXattr, owner: Owner) -> Result<()> {
    vfs::do_setxattr(obj, which.name(), owner.format().as_bytes(), 0)
}

impl Overlay {
    /// `st` of `node` with the owner and mode its layer's override attribute records.
    pub(crate) fn with_override(&self, node: &Node, mut st: Stat) -> Stat {
        if !self.layers.any_override || !applies_to(&st) {
            return st;
        }
        let Ok(top) = node.top() else {
            return st;
        };
        let Some(which) = self.layers.get(top.layer).and_then(|l| l.stat_override) else {
            return st;
        };
        if let Some(owner) = self
            .real_path_fd(node)
            .ok()
            .and_then(|obj| read(obj.as_fd(), which))
        {
            owner.apply(&mut st);
        }
        st
    }

    /// The attribute the upper layer keeps owners in, for an object of type `mode` (only
    /// directories and regular files are overridden).
    pub(crate) fn upper_override(&self, mode: u32) -> Option<OverrideXattr> {
        let kind = FileType::from_raw_mode(mode);
        if !matches!(kind, FileType::Directory | FileType::RegularFile) {
            return None;
        }
        self.layers.upper().and_then(|u| u.stat_override)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_like_fuse_overlayfs() {
        let o = Owner::parse(b"1000:100:4755").expect("valid");
        assert_eq!((o.uid, o.gid, o.mode), (1000, 100, 0o4755));
        assert_eq!(o.format(), "1000:100:4755");
        assert_eq!(Owner::parse(b"0:0:755:dir").map(|o| o.mode), Some(0o755));
        for bad in [&b""[..], b"1:2", b"a:b:755", b"1:2:9", b"\xff"] {
            assert_eq!(Owner::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn apply_keeps_the_file_type() {
        let mut st = sys::fs::zeroed_stat();
        st.st_mode = libc::S_IFDIR | 0o700;
        Owner::parse(b"5:6:1777").expect("valid").apply(&mut st);
        assert_eq!(st.st_mode, libc::S_IFDIR | 0o1777);
        assert_eq!((st.st_uid, st.st_gid), (5, 6));
        assert!(applies_to(&st));
        st.st_mode = libc::S_IFLNK | 0o777;
        assert!(!applies_to(&st));
        assert!(is_override_name(b"user.containers.override_stat"));
        assert!(!is_override_name(b"user.other"));
    }
}
