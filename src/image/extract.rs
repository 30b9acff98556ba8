//! Unpacking a layer tar into a directory, treating every entry as hostile.
//!
//! Names are cleaned first (absolute names and `..` are refused); every parent directory is
//! opened from the layer root with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so an entry can
//! never be written through a symlink an earlier entry made; every object is then made with a
//! single-component `*at` call that does not follow symlinks; hard links name their target
//! the same way, so they cannot reach a file outside the layer. Whiteouts (`.wh.NAME`,
//! `.wh..wh..opq`) are kept as they are: stratafs reads them natively. Device nodes are made
//! only with the privilege to (skipped and counted otherwise), owners only where they can be
//! represented (counted otherwise).

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::OFlags;
use tar::EntryType;

use crate::image::ImageError;
use crate::sys;
use crate::sys::fs::TimeSpec;

/// What unpacking a layer did beyond the plain entries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    /// Entries unpacked.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes skipped for lack of privilege.
    pub skipped_devices: u64,
    /// Objects whose owner could not be set (ids not mapped here).
    pub unowned: u64,
}

/// Metadata of a directory, applied once all entries are in (creating entries inside a
/// directory would change its times, and a read-only mode would block them).
struct DirMeta {
    path: Vec<OsString>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// Unpacks the tar stream `stream` into the directory `dest` (an empty directory).
/// `privileged` says whether device nodes may be made and owners set.
pub fn unpack<R: Read>(
    stream: R,
    dest: BorrowedFd<'_>,
    privileged: bool,
) -> Result<Unpacked, ImageError> {
    let mut archive = tar::Archive::new(stream);
    let mut done = Unpacked::default();
    let mut dirs: Vec<DirMeta> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Tar(format!("reading the layer: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::Tar(format!("reading the layer: {e}")))?;
        let raw_name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_name).into_owned();
        let ctx = |e: io::Error| ImageError::Tar(format!("{shown}: {e}"));
        let parts = clean_name(&raw_name)?;
        let Some((name, parents)) = parts.split_last() else {
            continue; // "./": the layer root itself
        };
        let header = entry.header().clone();
        let kind = header.entry_type();
        let parent = open_parent(dest, parents).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => ImageError::Unsafe(format!(
                "{shown}: a parent directory is a symbolic link or not a directory"
            )),
            _ => ctx(e),
        })?;
        let mode = header.mode().map_err(&ctx)? & 0o7777;
        let uid = header.uid().map_err(&ctx)?;
        let gid = header.gid().map_err(&ctx)?;
        let mtime = header.mtime().unwrap_or(0);
        if kind != EntryType::Directory {
            replace(parent.as_fd(), name).map_err(ctx)?;
        }
        match kind {
            EntryType::Directory => {
                match sys::fs::make_dir(parent.as_fd(), name, 0o700) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        if !sys::fs::stat_name(parent.as_fd(), name).is_ok_and(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir()
                        }) {
                            replace(parent.as_fd(), name).map_err(ctx)?;
                            sys::fs::make_dir(parent.as_fd(), name, 0o700).map_err(ctx)?;
                        }
                    }
                    other => other.map_err(ctx)?,
                }
                dirs.push(DirMeta {
                    path: parts.clone(),
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                done.entries += 1;
                continue;
            }
            EntryType::Regular | EntryType::Continuous => {
                let fd = sys::fs::create_file(parent.as_fd(), name, OFlags::WRONLY, 0o600)
                    .map_err(ctx)?;
                let mut file = std::fs::File::from(fd);
                done.bytes += io::copy(&mut entry, &mut file)
                    .map_err(|e| ImageError::Tar(format!("{shown}: reading the content: {e}")))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    ImageError::Format(format!("{shown}: symlink without a target"))
                })?;
                sys::fs::make_symlink(OsStr::from_bytes(&target), parent.as_fd(), name)
                    .map_err(ctx)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    ImageError::Format(format!("{shown}: hard link without a target"))
                })?;
                let tparts = clean_name(&target)?;
                let Some((tname, tparents)) = tparts.split_last() else {
                    return Err(ImageError::Unsafe(format!(
                        "{shown}: hard link to the layer root"
                    )));
                };
                let tdir = open_parent(dest, tparents).map_err(|_| {
                    ImageError::Unsafe(format!(
                        "{shown}: hard link target {} is not a file inside the layer",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                sys::fs::link(tdir.as_fd(), tname, parent.as_fd(), name).map_err(|e| {
                    ImageError::Format(format!(
                        "{shown}: hard link to {}: {e}",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                done.entries += 1;
                continue; // a link shares its target's metadata
            }
            EntryType::Char | EntryType::Block => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let ftype = if kind == EntryType::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                let rdev = rustix::fs::makedev(major, minor);
                match sys::fs::make_node(parent.as_fd(), name, ftype | mode, rdev) {
                    Err(e) if !privileged || e.raw_os_error() == Some(libc::EPERM) => {
                        done.skipped_devices += 1;
                        continue;
                    }
                    other => other.map_err(ctx)?,
                }
            }
            EntryType::Fifo => {
                sys::fs::make_node(parent.as_fd(), name, libc::S_IFIFO | mode, 0).map_err(ctx)?;
            }
            other => {
                return Err(ImageError::Format(format!(
                    "{shown}: unsupported tar entry type {other:?}"
                )));
            }
        }
        set_xattrs(&mut entry, parent.as_fd(), name, kind).map_err(ctx)?;
        done.unowned += u64::from(!set_owner(parent.as_fd(), name, uid, gid, privileged));
        if kind != EntryType::Symlink {
            sys::fs::chmod_name(parent.as_fd(), name, mode).map_err(ctx)?;
        }
        let t = TimeSpec::At(mtime as i64, 0);
        sys::fs::set_times(parent.as_fd(), name, t, t).map_err(ctx)?;
        done.entries += 1;
    }
    // Deepest first, so setting a directory's times is not undone by its children's.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.len()));
    for d in dirs {
        let (name, parents) = d
            .path
            .split_last()
            .ok_or(ImageError::Internal("empty path"))?;
        let shown = d.path.join(OsStr::new("/"));
        let ctx = |e: io::Error| ImageError::Tar(format!("{}: {e}", shown.to_string_lossy()));
        let parent = open_parent(dest, parents).map_err(ctx)?;
        done.unowned += u64::from(!set_owner(parent.as_fd(), name, d.uid, d.gid, privileged));
        sys::fs::chmod_name(parent.as_fd(), name, d.mode).map_err(ctx)?;
        let t = TimeSpec::At(d.mtime as i64, 0);
        sys::fs::set_times(parent.as_fd(), name, t, t).map_err(ctx)?;
    }
    Ok(done)
}

/// The components of a tar entry name: `./` and empty components dropped; an absolute name
/// or a `..` component is refused (never trusted, never "fixed").
pub fn clean_name(raw: &[u8]) -> Result<Vec<OsString>, ImageError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.first() == Some(&b'/') {
        return Err(ImageError::Unsafe(format!("absolute name {:?}", shown())));
    }
    let mut parts = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(ImageError::Unsafe(format!(
                    "name {:?} climbs out with '..'",
                    shown()
                )));
            }
            c if c.contains(&0) => {
                return Err(ImageError::Unsafe(format!(
                    "name {:?} has a NUL byte",
                    shown()
                )));
            }
            c => parts.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(parts)
}

/// Opens (creating missing directories, mode 0755) the directory `parts` below `dest`, never
/// through a symlink.
fn open_parent(dest: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<OwnedFd> {
    let mut dir = sys::fs::open_dir_path(dest, OsStr::new("."))?;
    for p in parts {
        dir = match sys::fs::open_dir_path(dir.as_fd(), p) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                sys::fs::make_dir(dir.as_fd(), p, 0o755)?;
                sys::fs::open_dir_path(dir.as_fd(), p)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(dir)
}

/// Removes whatever `name` is (a later entry of a tar replaces an earlier one).
fn replace(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match sys::fs::stat_name(dir, name) {
        Ok(_) => sys::fs::remove_tree(dir, name),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the owner; false when it could not be set (ids not mapped, no privilege).
fn set_owner(dir: BorrowedFd<'_>, name: &OsStr, uid: u64, gid: u64, privileged: bool) -> bool {
    let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return false;
    };
    let me = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    if (uid, gid) == me {
        return true;
    }
    privileged && sys::fs::chown_name(dir, name, Some(uid), Some(gid)).is_ok()
}

/// Extended attributes from PAX `SCHILY.xattr.*` records (file capabilities, ACLs, ...).
/// Names the layer's filesystem or our privileges cannot hold are skipped, as tar does.
fn set_xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: EntryType,
) -> io::Result<()> {
    if kind == EntryType::Symlink {
        return Ok(());
    }
    let Some(exts) = entry.pax_extensions()? else {
        return Ok(());
    };
    let mut pairs = Vec::new();
    for ext in exts {
        let ext = ext?;
        if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            pairs.push((key.to_vec(), ext.value_bytes().to_vec()));
        }
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let obj = sys::fs::open_path(dir, name)?;
    for (key, value) in pairs {
        let _ = sys::fs::set_xattr(obj.as_fd(), OsStr::from_bytes(&key), &value, 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_or_refused() {
        let ok = |s: &str| clean_name(s.as_bytes()).expect(s);
        assert_eq!(ok("./a/b/"), vec![OsString::from("a"), OsString::from("b")]);
        assert_eq!(ok("a//./c"), vec![OsString::from("a"), OsString::from("c")]);
        assert!(ok("./").is_empty());
        for bad in ["/etc/passwd", "../x", "a/../../b", "a/.."] {
            assert!(
                matches!(clean_name(bad.as_bytes()), Err(ImageError::Unsafe(_))),
                "{bad}"
            );
        }
    }
}
