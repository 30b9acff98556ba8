//! fd-relative access to layer directories.
//!
//! Every touch of a layer starts from a directory fd inside that layer and goes through
//! `openat2(2)` with [`RESOLVE`] (never beneath-escaping, never following a symlink), or through
//! an `*at` call on a single name component with `AT_SYMLINK_NOFOLLOW`, which cannot leave the
//! directory either. Host path strings are only used at mount time to open the layer roots.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat, StatVfs};

/// Resolution rules for every path walked inside a layer: stay beneath the starting directory
/// and refuse every symlink (including `/proc` magic links) on the way.
pub const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens `path` beneath `dir` with [`RESOLVE`]; `O_NOFOLLOW` and `O_CLOEXEC` are always added.
///
/// `EAGAIN` (a concurrent rename raced the resolution, see openat2(2)) is retried a few times.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &OsStr, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), RESOLVE) {
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) if tries < 16 => {
                tries += 1;
            }
            res => return res.map_err(io::Error::from),
        }
    }
}

/// Opens an `O_PATH` handle on `path` beneath `dir` (the object itself if it is a symlink).
pub fn open_path(dir: BorrowedFd<'_>, path: &OsStr) -> io::Result<OwnedFd> {
    open_beneath(dir, path, OFlags::PATH)
}

/// Opens an `O_PATH` handle on a directory beneath `dir`.
pub fn open_dir_path(dir: BorrowedFd<'_>, path: &OsStr) -> io::Result<OwnedFd> {
    open_beneath(dir, path, OFlags::PATH | OFlags::DIRECTORY)
}

/// Opens a host directory given by the user (a layer root, the workdir) as an `O_PATH` handle.
///
/// Symlinks are followed here on purpose: podman passes layers as `l/ID -> ../ID/diff`.
pub fn open_host_dir(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// `lstat` of one name in `dir`. `name` must be a single component (checked): with
/// `AT_SYMLINK_NOFOLLOW` such a call cannot leave `dir`.
pub fn stat_name(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    check_single_component(name)?;
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

/// `fstat` of an fd, `O_PATH` fds included.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    rustix::fs::fstat(fd).map_err(io::Error::from)
}

/// Reads the target of the symlink `name` in `dir` (single component).
pub fn read_link(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    check_single_component(name)?;
    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(target.into_bytes())
}

/// `statvfs` of the filesystem holding `fd`.
pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<StatVfs> {
    rustix::fs::fstatvfs(fd).map_err(io::Error::from)
}

/// Lists the names in the directory `dir` (an `O_PATH` handle is fine; it is reopened for
/// reading). `.` and `..` are left out. Each entry carries its `d_ino` and `d_type`.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<RawDirEntry>> {
    let fd = open_beneath(dir, OsStr::new("."), OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut out = Vec::new();
    let mut stream = rustix::fs::Dir::new(fd)?;
    while let Some(entry) = stream.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(RawDirEntry {
            name: OsStr::from_bytes(name).to_owned(),
            ino: entry.ino(),
            file_type: entry.file_type(),
        });
    }
    Ok(out)
}

/// One entry as `getdents64` returns it.
#[derive(Debug, Clone)]
pub struct RawDirEntry {
    /// The entry's name (bytes, not necessarily UTF-8).
    pub name: std::ffi::OsString,
    /// `d_ino` on the layer's filesystem.
    pub ino: u64,
    /// `d_type`; `Unknown` on filesystems that do not fill it in.
    pub file_type: rustix::fs::FileType,
}

/// Reads the extended attribute `name` of the object behind `fd` (`O_PATH` allowed, symlinks
/// included) into a new buffer. `Ok(None)` when the attribute does not exist.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
    let path = proc_fd_path(fd);
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::getxattr(path.as_c_str(), name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(rustix::io::Errno::RANGE) => {
                let size = rustix::fs::getxattr_query(path.as_c_str(), name)?;
                buf.resize(size.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Lists the extended attribute names of the object behind `fd` as the raw NUL-separated
/// buffer `listxattr(2)` returns.
pub fn list_xattr(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let path = proc_fd_path(fd);
    let mut buf = vec![0u8; 1024];
    loop {
        match rustix::fs::listxattr(path.as_c_str(), &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let size = rustix::fs::listxattr_query(path.as_c_str())?;
                buf.resize(size.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `/proc/self/fd/N`: the way to reach the xattrs of an object held by an `O_PATH` fd
/// (`fgetxattr` refuses `O_PATH` fds, and symlinks cannot be opened otherwise). The magic link
/// resolves to the object itself, never to a symlink's target.
fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    let mut s = b"/proc/self/fd/".to_vec();
    s.extend_from_slice(fd.as_raw_fd().to_string().as_bytes());
    // A formatted integer never contains NUL.
    CString::new(s).unwrap_or_else(|_| c"/proc/self/fd/-1".to_owned())
}

/// Refuses names that would walk more than one component.
fn check_single_component(name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Positional read that fills `buf` as far as the file allows (short only at end of file).
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Whether `fd` refers to a directory on which the caller may rely (used for layer roots).
pub fn is_dir(fd: impl AsFd) -> io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory)
}

/// Creates the directory `name` in `dir` with `mode` (single component).
pub fn make_dir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    check_single_component(name)?;
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)).map_err(io::Error::from)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, without ever
/// following a symlink (used to empty the workdir at mount).
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = stat_name(dir, name)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        let sub = open_dir_path(dir, name)?;
        for entry in read_dir(sub.as_fd())? {
            remove_tree(sub.as_fd(), &entry.name)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}
