//! POSIX ACLs of new objects (kernel `posix_acl_create`, as overlayfs applies it in
//! `ovl_create_or_link`).
//!
//! The kernel hands us the mode unmasked with the caller's umask beside it (`FUSE_DONT_MASK`),
//! because the umask only applies where the parent has no default ACL. Where it has one, the
//! new object's permissions come from that ACL instead, and it inherits it. An object made in
//! the workdir (over a whiteout) has no parent to inherit from, so the inheritance is written
//! explicitly, the same way wherever the object is made.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use crate::error::{Error, Result};
use crate::sys;

/// `system.posix_acl_access`: the access ACL of an object.
pub const ACCESS: &str = "system.posix_acl_access";
/// `system.posix_acl_default`: the ACL a directory passes on to new objects.
pub const DEFAULT: &str = "system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// The permissions and ACLs a new object gets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NewAcls {
    /// The permission bits (with the caller's set-id and sticky bits).
    pub perm: u32,
    /// An access ACL to write, when the inherited one says more than the mode.
    pub access: Option<Vec<u8>>,
    /// A default ACL to write (directories inherit their parent's).
    pub default: Option<Vec<u8>>,
}

/// Computes what a new object with the requested `perm` gets under a parent whose default ACL
/// is `parent_default` (read with [`parent_default`]), for a caller with `umask`.
pub fn for_new_object(
    perm: u32,
    umask: u32,
    is_dir: bool,
    parent_default: Option<&[u8]>,
) -> Result<NewAcls> {
    let Some(acl) = parent_default else {
        return Ok(NewAcls {
            perm: perm & !(umask & 0o777),
            ..NewAcls::default()
        });
    };
    let mut entries = parse(acl)?;
    let mut mode = perm & 0o777;
    let mut not_equiv = false;
    let (mut group_obj, mut mask) = (None, None);
    for (i, (tag, p)) in entries.iter_mut().enumerate() {
        match *tag {
            USER_OBJ => {
                *p &= (mode >> 6) as u16 | !7;
                mode &= (u32::from(*p) << 6) | !0o700;
            }
            USER | GROUP => not_equiv = true,
            GROUP_OBJ => group_obj = Some(i),
            OTHER => {
                *p &= mode as u16 | !7;
                mode &= u32::from(*p) | !0o007;
            }
            MASK => {
                mask = Some(i);
                not_equiv = true;
            }
            _ => return Err(corrupt()),
        }
    }
    let i = mask.or(group_obj).ok_or_else(corrupt)?;
    let p = &mut entries[i].1;
    *p &= (mode >> 3) as u16 | !7;
    mode &= (u32::from(*p) << 3) | !0o070;
    Ok(NewAcls {
        perm: (perm & !0o777) | (mode & 0o777),
        access: not_equiv.then(|| rewrite(acl, &entries)),
        default: is_dir.then(|| acl.to_vec()),
    })
}

/// The default ACL of directory `dir`, if it has one.
pub fn parent_default(dir: BorrowedFd<'_>) -> Result<Option<Vec<u8>>> {
    match sys::fs::get_xattr(dir, OsStr::new(DEFAULT)) {
        Ok(v) => Ok(v),
        // A filesystem without ACLs: nothing to inherit.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(Error::io("read default ACL", e)),
    }
}

fn corrupt() -> Error {
    Error::io("default ACL", std::io::Error::from_raw_os_error(libc::EIO))
}

/// The (tag, perm) of each entry of an ACL xattr: a u32 version, then 8-byte entries
/// (u16 tag, u16 perm, u32 id), little-endian.
fn parse(acl: &[u8]) -> Result<Vec<(u16, u16)>> {
    let (head, body) = acl.split_at_checked(4).ok_or_else(corrupt)?;
    if u32::from_le_bytes(head.try_into().map_err(|_| corrupt())?) != VERSION || body.len() % 8 != 0
    {
        return Err(corrupt());
    }
    Ok(body
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
            )
        })
        .collect())
}

/// `acl` with the permissions of `entries` (same order, same ids).
fn rewrite(acl: &[u8], entries: &[(u16, u16)]) -> Vec<u8> {
    let mut out = acl.to_vec();
    for (i, (_, p)) in entries.iter().enumerate() {
        let at = 4 + i * 8 + 2;
        out[at..at + 2].copy_from_slice(&p.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (t, p, id) in entries {
            v.extend(t.to_le_bytes());
            v.extend(p.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        v
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn without_a_default_acl_the_umask_applies() {
        let n = for_new_object(0o2666, 0o022, false, None).unwrap();
        assert_eq!(
            n,
            NewAcls {
                perm: 0o2644,
                access: None,
                default: None
            }
        );
    }

    #[test]
    fn a_default_acl_replaces_the_umask_and_is_inherited() {
        // setfacl -d -m u:1000:rwx -m o::- on a 755 directory.
        let def = acl(&[
            (USER_OBJ, 7, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, ANY),
            (MASK, 7, ANY),
            (OTHER, 0, ANY),
        ]);
        let f = for_new_object(0o666, 0o022, false, Some(&def)).unwrap();
        assert_eq!(f.perm, 0o660);
        let want = acl(&[
            (USER_OBJ, 6, ANY),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, ANY),
            (MASK, 6, ANY),
            (OTHER, 0, ANY),
        ]);
        assert_eq!(f.access, Some(want));
        assert_eq!(f.default, None);
        let d = for_new_object(0o777, 0o022, true, Some(&def)).unwrap();
        assert_eq!(d.perm, 0o770);
        assert_eq!(d.default, Some(def));
    }

    #[test]
    fn a_minimal_default_acl_sets_only_the_mode() {
        let def = acl(&[(USER_OBJ, 7, ANY), (GROUP_OBJ, 5, ANY), (OTHER, 5, ANY)]);
        let f = for_new_object(0o666, 0o077, false, Some(&def)).unwrap();
        assert_eq!(f.perm, 0o644);
        assert_eq!(f.access, None);
    }

    #[test]
    fn corrupt_acls_are_errors_not_panics() {
        for bad in [
            &b""[..],
            &b"\x02\x00\x00"[..],
            &b"\x01\x00\x00\x00"[..],
            &b"\x02\x00\x00\x00\x01"[..],
        ] {
            assert!(for_new_object(0o666, 0, false, Some(bad)).is_err());
        }
        let no_group = acl(&[(USER_OBJ, 7, ANY), (OTHER, 5, ANY)]);
        assert!(for_new_object(0o666, 0, false, Some(&no_group)).is_err());
    }
}
