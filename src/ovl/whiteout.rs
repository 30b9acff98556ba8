//! Every whiteout and opaque-directory encoding, read in one place.
//!
//! Whiteouts (a name deleted in a layer, hiding the same name below):
//! - a character device 0/0 (kernel overlayfs, fuse-overlayfs);
//! - a `.wh.NAME` file (OCI image-spec layer.md and AUFS; what containers-storage unpacks for
//!   mount programs). It applies to lower layers only, never to its own layer;
//! - an "xattr whiteout": a zero-size regular file carrying `overlay.whiteout` in a directory
//!   marked `overlay.opaque=x` (kernel 6.7+, `ovl_path_is_whiteout`).
//!
//! Opaque directories (hide everything below): `trusted.overlay.opaque=y`,
//! `user.overlay.opaque=y`, `user.fuseoverlayfs.opaque=y`, or a `.wh..wh..opq` file inside.
//!
//! Mirrors the reading half of kernel `fs/overlayfs/util.c`/`namei.c` (`ovl_is_whiteout`,
//! `ovl_is_opaquedir`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use rustix::fs::{FileType, Stat};

use crate::sys;

/// Prefix of AUFS/OCI whiteout files; names starting with it never appear in the merged view.
pub const WH_PREFIX: &[u8] = b".wh.";
/// The AUFS/OCI opaque-directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

const OPAQUE_XATTRS: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];
const IMPURE_XATTRS: [&str; 2] = ["trusted.overlay.impure", "user.overlay.impure"];
const ORIGIN_XATTRS: [&str; 2] = ["trusted.overlay.origin", "user.overlay.origin"];
const WHITEOUT_XATTRS: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];

/// Prefixes of the extended attributes that belong to the overlay itself and are never shown
/// to users (kernel `ovl_is_private_xattr`, plus fuse-overlayfs's own namespace).
pub const PRIVATE_XATTR_PREFIXES: [&[u8]; 3] = [
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
];

/// Whether `name` is an overlay-private extended attribute.
pub fn is_private_xattr(name: &[u8]) -> bool {
    PRIVATE_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether `name` is reserved for whiteout markers (`.wh.*`) and so never a merged entry.
pub fn is_reserved_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WH_PREFIX)
}

/// `.wh.NAME`, the AUFS/OCI whiteout for `name`.
pub fn wh_name(name: &OsStr) -> OsString {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// The name a `.wh.` entry hides, or `None` for the opaque marker and non-markers.
pub fn hidden_by_wh(entry: &OsStr) -> Option<&OsStr> {
    let b = entry.as_bytes();
    if b == OPAQUE_MARKER || !b.starts_with(WH_PREFIX) || b.len() == WH_PREFIX.len() {
        return None;
    }
    Some(OsStr::from_bytes(&b[WH_PREFIX.len()..]))
}

/// Whether an `lstat` result is a kernel whiteout (character device 0/0).
pub fn is_chardev_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Whether `name` in `dir` could be an xattr whiteout by its `lstat` alone.
pub fn may_be_xattr_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_size == 0
}

/// Whether the zero-size regular file `name` in `dir` carries the whiteout xattr.
pub fn is_xattr_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let fd = sys::fs::open_path(dir, name)?;
    for attr in WHITEOUT_XATTRS {
        if sys::fs::get_xattr(fd.as_fd(), OsStr::new(attr))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes the `.wh.NAME` whiteout file for `name` from the layer directory `dir`, if there is
/// one. A name of 252 bytes or more cannot have one: its `.wh.` name would be too long.
pub fn remove_wh_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match sys::fs::unlink(dir, &wh_name(name), false) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENAMETOOLONG)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Whether the layer directory `dir` holds a `.wh.NAME` whiteout for `name`.
pub fn has_wh_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    match sys::fs::stat_name(dir, &wh_name(name)) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENAMETOOLONG)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What a layer's copy of a directory says about the layers below it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirMarkers {
    /// Nothing below shows through.
    pub opaque: bool,
    /// `overlay.opaque=x`: some entries may be xattr whiteouts.
    pub xwhiteouts: bool,
    /// `overlay.impure=y`: some entries were copied up and carry an origin.
    pub impure: bool,
    /// An `overlay.redirect` attribute is present (read it with [`redirect`]); known from the
    /// attribute list, so that lookups of ordinary directories skip two reads.
    pub redirect: bool,
}

/// Reads the opaque markers of the directory held by `dir` (an `O_PATH` handle).
pub fn dir_markers(dir: BorrowedFd<'_>) -> io::Result<DirMarkers> {
    let mut markers = DirMarkers::default();
    let names = match sys::fs::list_xattr(dir) {
        Ok(n) => n,
        // Filesystems without xattrs can still carry the .wh..wh..opq marker.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
        Err(e) => return Err(e),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if IMPURE_XATTRS.iter().any(|a| a.as_bytes() == name) {
            markers.impure = true;
            continue;
        }
        if REDIRECT_XATTRS.iter().any(|a| a.as_bytes() == name) {
            markers.redirect = true;
            continue;
        }
        if OPAQUE_XATTRS.iter().any(|a| a.as_bytes() == name) {
            match sys::fs::get_xattr(dir, OsStr::from_bytes(name))?.as_deref() {
                Some(b"y") | Some(b"y\0") => markers.opaque = true,
                Some(b"x") | Some(b"x\0") => markers.xwhiteouts = true,
                _ => {}
            }
        }
    }
    if !markers.opaque {
        match sys::fs::stat_name(dir, OsStr::from_bytes(OPAQUE_MARKER)) {
            Ok(_) => markers.opaque = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(markers)
}

/// Whether the upper regular file behind `obj` is a metadata-only copy-up.
pub fn is_metacopy(obj: BorrowedFd<'_>) -> io::Result<bool> {
    for attr in ["trusted.overlay.metacopy", "user.overlay.metacopy"] {
        match sys::fs::get_xattr(obj, OsStr::new(attr)) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether entry `name` of directory `dir` is a metadata-only copy-up, read without opening
/// it where the kernel allows (lookups ask this of every file in a deep stack).
pub fn is_metacopy_entry(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    for attr in ["trusted.overlay.metacopy", "user.overlay.metacopy"] {
        match sys::fs::get_xattr_at(dir, name, OsStr::new(attr)) {
            Some(Ok(Some(_))) => return Ok(true),
            Some(Ok(None)) => {}
            Some(Err(e)) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPERM)) => {}
            Some(Err(e)) => return Err(e),
            None => return is_metacopy(sys::fs::open_path(dir, name)?.as_fd()),
        }
    }
    Ok(false)
}

/// The copy-up origin recorded on an upper object (kernel `struct ovl_fb` bytes), if any.
pub fn origin(obj: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    for attr in ORIGIN_XATTRS {
        match sys::fs::get_xattr(obj, OsStr::new(attr)) {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Encodes the kernel's origin record (`struct ovl_fb`: version 0, magic 0xfb, length, flags,
/// handle type, filesystem UUID, handle) for the lower object behind `obj`; `None` when its
/// filesystem cannot make file handles (the kernel then records no origin either).
pub fn encode_origin(obj: BorrowedFd<'_>, fs_uuid: &[u8; 16]) -> Option<Vec<u8>> {
    let (handle_type, handle) = sys::fs::file_handle(obj).ok()?;
    let len = 5 + 16 + handle.len();
    if len > 255 || !(0..=255).contains(&handle_type) {
        return None;
    }
    let mut fb = vec![0u8, 0xfb, len as u8, 0, handle_type as u8];
    fb.extend_from_slice(fs_uuid);
    fb.extend_from_slice(&handle);
    Some(fb)
}

/// Names of the redirect xattr, trusted (privileged mounts) and user (`userxattr`).
const REDIRECT_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "user.overlay.redirect"];

/// The redirect of the directory held by `dir`, if any: `/a/b` is a path from the layer roots,
/// anything else a name in the parent's lower directories (kernel `ovl_check_redirect`).
pub fn redirect(dir: BorrowedFd<'_>) -> io::Result<Option<crate::ovl::inode::Loc>> {
    for attr in REDIRECT_XATTRS {
        let value = match sys::fs::get_xattr(dir, OsStr::new(attr)) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EPERM)) => {
                continue;
            }
            Err(e) => return Err(e),
        };
        let value: Vec<u8> = value.into_iter().take_while(|b| *b != 0).collect();
        if value.is_empty() {
            continue;
        }
        // Malformed redirects fail the lookup with the kernel's errnos
        // (ovl_get_redirect_xattr: EINVAL; a "." or ".." component: EACCES from
        // lookup_one_len). None is ever followed, so none can climb out of the layer.
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let dot = |c: &[u8]| c == b"." || c == b"..";
        if value[0] == b'/' {
            let rel = &value[1..];
            if rel.is_empty() || rel.split(|b| *b == b'/').any(|c| c.is_empty()) {
                return Err(einval());
            }
            if rel.split(|b| *b == b'/').any(dot) {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            return Ok(Some(crate::ovl::inode::Loc::Abs(std::path::PathBuf::from(
                OsString::from_vec(rel.to_vec()),
            ))));
        }
        if value.contains(&b'/') {
            return Err(einval());
        }
        if dot(&value) {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        return Ok(Some(crate::ovl::inode::Loc::Renamed(OsString::from_vec(
            value,
        ))));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wh_names() {
        assert_eq!(wh_name(OsStr::new("a")), OsString::from(".wh.a"));
        assert_eq!(hidden_by_wh(OsStr::new(".wh.a")), Some(OsStr::new("a")));
        assert_eq!(hidden_by_wh(OsStr::new(".wh..wh..opq")), None);
        assert_eq!(hidden_by_wh(OsStr::new("a")), None);
        assert!(is_reserved_name(OsStr::new(".wh.x")));
        assert!(!is_reserved_name(OsStr::new(".whx")));
    }

    #[test]
    fn private_xattrs() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.fuseoverlayfs.origin"));
        assert!(!is_private_xattr(b"user.overlayfoo"));
        assert!(!is_private_xattr(b"security.capability"));
    }
}
