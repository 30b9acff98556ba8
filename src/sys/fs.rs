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
    let mut out = Vec::new();
    read_dir_each(
        dir,
        |e| e,
        |entry| {
            out.push(entry);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Passes each entry of the directory `dir` to `each` as it is read, as [`read_dir`] lists
/// them, stopping at the first error (`io_error` turns the directory's own into `E`).
/// Why: a caller that keeps only part of each entry (a merged listing) then never holds the
/// whole directory twice.
pub fn read_dir_each<E>(
    dir: BorrowedFd<'_>,
    io_error: impl Fn(io::Error) -> E,
    mut each: impl FnMut(RawDirEntry) -> Result<(), E>,
) -> Result<(), E> {
    let fd = open_beneath(dir, OsStr::new("."), OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(&io_error)?;
    let mut stream = rustix::fs::Dir::new(fd).map_err(|e| io_error(e.into()))?;
    while let Some(entry) = stream.read() {
        let entry = entry.map_err(|e| io_error(e.into()))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        each(RawDirEntry {
            name: OsStr::from_bytes(name).to_owned(),
            ino: entry.ino(),
            file_type: entry.file_type(),
        })?;
    }
    Ok(())
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

/// Reads the extended attribute `xname` of the entry `entry` of directory `dir` (never
/// following it when it is a symlink) with one system call where the kernel has
/// getxattrat(2) (Linux 6.13); `None` where it has not, or for values over 4 KiB (then the
/// caller opens the entry and uses [`get_xattr`]).
/// Why: the common `ls -l` of a FUSE mount asks for an attribute of every file, and the
/// open, `/proc/self/fd` walk and close it otherwise takes cost a tenth of that request.
pub fn get_xattr_at(
    dir: BorrowedFd<'_>,
    entry: &OsStr,
    xname: &OsStr,
) -> Option<io::Result<Option<Vec<u8>>>> {
    check_single_component(entry).ok()?;
    let mut buf = vec![0u8; 4096];
    match xattrat::get(dir, entry, xname, &mut buf)? {
        Ok(n) => {
            buf.truncate(n);
            Some(Ok(Some(buf)))
        }
        Err(libc::ENODATA) => Some(Ok(None)),
        Err(libc::ERANGE) => None,
        Err(e) => Some(Err(io::Error::from_raw_os_error(e))),
    }
}

/// getxattrat(2), called directly: libc has no wrapper or number for it on most targets yet.
mod xattrat {
    use std::ffi::{CString, OsStr};
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The kernel's `struct xattr_args`.
    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    /// The number in the table the newer architectures share (Linux 6.13); `None` where
    /// the call has another number or none.
    const SYS_GETXATTRAT: Option<libc::c_long> = if cfg!(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )) {
        Some(464)
    } else {
        None
    };

    /// Set once the kernel (or a seccomp filter) answered ENOSYS.
    static MISSING: AtomicBool = AtomicBool::new(false);

    /// `Some(Ok(length))`, `Some(Err(errno))`, or `None` when the call is unavailable.
    pub(super) fn get(
        dir: BorrowedFd<'_>,
        entry: &OsStr,
        xname: &OsStr,
        buf: &mut [u8],
    ) -> Option<Result<usize, i32>> {
        let nr = SYS_GETXATTRAT?;
        if MISSING.load(Ordering::Relaxed) {
            return None;
        }
        let entry = CString::new(entry.as_bytes()).ok()?;
        let xname = CString::new(xname.as_bytes()).ok()?;
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: u32::try_from(buf.len()).ok()?,
            flags: 0,
        };
        let at_flags = libc::AT_SYMLINK_NOFOLLOW;
        // SAFETY: every pointer is valid for the call: two NUL-terminated strings, the
        // argument block with its size, and `buf`, whose length the block gives.
        let rc = unsafe {
            libc::syscall(
                nr,
                dir.as_raw_fd(),
                entry.as_ptr(),
                at_flags,
                xname.as_ptr(),
                &mut args as *mut XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        };
        if rc >= 0 {
            return usize::try_from(rc).ok().map(Ok);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOSYS) => {
                MISSING.store(true, Ordering::Relaxed);
                None
            }
            // A seccomp filter may answer EPERM for calls it does not know: the old way
            // then decides.
            Some(libc::EPERM) | None => None,
            Some(e) => Some(Err(e)),
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

/// One `pread` (retried only when interrupted): for files opened with `O_DIRECT`, where a
/// short read means the end of the file and a second read from there would be unaligned.
pub fn pread_once(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        match rustix::io::pread(fd, &mut *buf, offset) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
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

/// Creates a regular file `name` in `dir` (`O_CREAT | O_EXCL`, never following symlinks) and
/// returns it open with `flags`.
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlags,
    mode: u32,
) -> io::Result<OwnedFd> {
    check_single_component(name)?;
    let flags = flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat2(dir, name, flags, Mode::from_raw_mode(mode), RESOLVE)
        .map_err(io::Error::from)
}

/// `mknodat` of one name (fifo, socket, devices, and the 0/0 whiteout).
pub fn make_node(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    check_single_component(name)?;
    let file_type = rustix::fs::FileType::from_raw_mode(mode);
    rustix::fs::mknodat(
        dir,
        name,
        file_type,
        Mode::from_raw_mode(mode & 0o7777),
        rdev,
    )
    .map_err(io::Error::from)
}

/// `symlinkat(target, dir, name)`.
pub fn make_symlink(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    check_single_component(name)?;
    rustix::fs::symlinkat(target, dir, name).map_err(io::Error::from)
}

/// `linkat(olddir, oldname, newdir, newname, 0)`: never follows a symlink.
pub fn link(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
) -> io::Result<()> {
    check_single_component(oldname)?;
    check_single_component(newname)?;
    rustix::fs::linkat(olddir, oldname, newdir, newname, AtFlags::empty()).map_err(io::Error::from)
}

/// `unlinkat`; `dir_flag` removes a directory.
pub fn unlink(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    check_single_component(name)?;
    let flags = if remove_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rustix::fs::unlinkat(dir, name, flags).map_err(io::Error::from)
}

/// `renameat2` with `RENAME_*` flags (raw bits).
pub fn rename(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    check_single_component(oldname)?;
    check_single_component(newname)?;
    let flags = rustix::fs::RenameFlags::from_bits_retain(flags);
    rustix::fs::renameat_with(olddir, oldname, newdir, newname, flags).map_err(io::Error::from)
}

/// Sets an extended attribute on the object behind `fd` (`O_PATH` allowed, see
/// [`get_xattr`]). `flags` are `XATTR_CREATE`/`XATTR_REPLACE` bits.
pub fn set_xattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: u32) -> io::Result<()> {
    let path = proc_fd_path(fd);
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags);
    rustix::fs::setxattr(path.as_c_str(), name, value, flags).map_err(io::Error::from)
}

/// Removes an extended attribute from the object behind `fd`.
pub fn remove_xattr(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let path = proc_fd_path(fd);
    rustix::fs::removexattr(path.as_c_str(), name).map_err(io::Error::from)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; `None` leaves an id unchanged.
pub fn chown_name(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    check_single_component(name)?;
    rustix::fs::chownat(
        dir,
        name,
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

/// `fchmodat(dir, name, mode)` (never on symlinks: Linux cannot chmod them).
pub fn chmod_name(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    check_single_component(name)?;
    rustix::fs::chmodat(
        dir,
        name,
        Mode::from_raw_mode(mode & 0o7777),
        AtFlags::empty(),
    )
    .map_err(io::Error::from)
}

/// A timestamp for [`set_times`]: a value, "now", or "leave alone".
#[derive(Debug, Clone, Copy)]
pub enum TimeSpec {
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
    /// `UTIME_NOW`.
    Now,
    /// `UTIME_OMIT`.
    Omit,
}

fn timespec(t: TimeSpec) -> rustix::fs::Timespec {
    match t {
        TimeSpec::At(s, ns) => rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns as _,
        },
        TimeSpec::Now => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW as _,
        },
        TimeSpec::Omit => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT as _,
        },
    }
}

/// `utimensat(dir, name, [atime, mtime], AT_SYMLINK_NOFOLLOW)`.
pub fn set_times(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> io::Result<()> {
    check_single_component(name)?;
    let times = rustix::fs::Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

/// Same as [`set_times`] for the directory held by `fd` itself.
pub fn set_times_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let times = rustix::fs::Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    };
    rustix::fs::utimensat(fd, "", &times, AtFlags::EMPTY_PATH).map_err(io::Error::from)
}

/// Whether a copy must be on stable storage when [`copy_data`] returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// fsync at the end, as kernel overlayfs does for a copy-up. (Starting writeback of each
    /// chunk as soon as it is copied was measured: no faster on a 1 GiB copy-up.)
    Synced,
    /// Left to the page cache (`volatile` mounts).
    Cached,
}

/// Copies the whole content of `src` into the empty file `dst`, fastest way first: a reflink
/// (`FICLONE`), else `copy_file_range` over the data extents only (holes stay holes), else
/// read/write with a large buffer. `dst` ends up exactly `size` bytes long, and on disk when
/// `durability` asks for it.
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    durability: Durability,
) -> io::Result<()> {
    copy_content(src, dst, size)?;
    if durability == Durability::Synced {
        rustix::fs::fsync(dst)?;
    }
    Ok(())
}

fn copy_content(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut pos = 0u64;
    while pos < size {
        // Find the next data extent; filesystems without SEEK_DATA report everything as data.
        let data = match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole remains
            Err(_) => pos,
        };
        let hole = rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(data)).unwrap_or(size);
        let end = hole.min(size);
        copy_range(src, dst, data, end)?;
        pos = end;
    }
    rustix::fs::ftruncate(dst, size)?;
    Ok(())
}

/// Copies bytes `[start, end)` of `src` to the same offsets of `dst`.
fn copy_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, start: u64, end: u64) -> io::Result<()> {
    let mut off = start;
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while off < end {
        let want = (end - off).min(1 << 30) as usize;
        if use_cfr {
            let mut in_off = off;
            let mut out_off = off;
            match rustix::fs::copy_file_range(src, Some(&mut in_off), dst, Some(&mut out_off), want)
            {
                Ok(0) => break,
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => use_cfr = false,
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        let chunk = want.min(buf.len());
        let n = pread_full(src, &mut buf[..chunk], off)?;
        if n == 0 {
            break;
        }
        pwrite_all(dst, &buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Positional write of all of `data`.
pub fn pwrite_all(fd: BorrowedFd<'_>, mut data: &[u8], mut offset: u64) -> io::Result<usize> {
    let total = data.len();
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(total)
}

/// Opens the object behind an `O_PATH` handle again with real access `flags`, through its
/// `/proc/self/fd` magic link (which resolves to the object itself, never to a path).
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> io::Result<OwnedFd> {
    let path = proc_fd_path(fd);
    rustix::fs::open(path.as_c_str(), flags | OFlags::CLOEXEC, Mode::empty())
        .map_err(io::Error::from)
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`: change the owner of the object behind an `O_PATH` fd.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    rustix::fs::chownat(
        fd,
        "",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
    .map_err(io::Error::from)
}

/// chmod of the object behind an `O_PATH` fd (through its magic link).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let path = proc_fd_path(fd);
    rustix::fs::chmod(path.as_c_str(), Mode::from_raw_mode(mode & 0o7777)).map_err(io::Error::from)
}

/// Links the object behind an `O_PATH` fd under `newname` in `newdir` (through its
/// `/proc/self/fd` magic link, which names the object itself even when it has no name left).
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    check_single_component(newname)?;
    let path = proc_fd_path(fd);
    rustix::fs::linkat(
        rustix::fs::CWD,
        path.as_c_str(),
        newdir,
        newname,
        AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// The file handle of the object behind `fd` (`name_to_handle_at(fd, "", AT_EMPTY_PATH)`):
/// `(handle type, handle bytes)`. Used for the kernel's `overlay.origin` format.
pub fn file_handle(fd: BorrowedFd<'_>) -> io::Result<(i32, Vec<u8>)> {
    const MAX_HANDLE_SZ: usize = 128;
    #[repr(C)]
    struct Handle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; MAX_HANDLE_SZ],
    }
    let mut h = Handle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a properly sized `struct file_handle` with room for MAX_HANDLE_SZ bytes as
    // announced in handle_bytes; the path is a valid empty C string; mount_id is a valid int.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let n = (h.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((h.handle_type, h.f_handle[..n].to_vec()))
}

/// The filesystem UUID of the filesystem holding `fd` (`FS_IOC_GETFSUUID`), or zeros when
/// the filesystem has none.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> [u8; 16] {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;
    let Ok(dir) = reopen(fd, OFlags::RDONLY) else {
        return [0; 16];
    };
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: FS_IOC_GETFSUUID writes at most sizeof(struct fsuuid2) = 17 bytes into `u`.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETFSUUID, &mut u as *mut FsUuid2) };
    if rc != 0 || u.len as usize != 16 {
        return [0; 16];
    }
    u.uuid
}

/// `FS_IOC_GETFLAGS` of `fd`: the inode flags `lsattr` shows (`FS_*_FL`).
pub fn inode_flags(fd: BorrowedFd<'_>) -> io::Result<u32> {
    rustix::fs::ioctl_getflags(fd)
        .map(|f| f.bits())
        .map_err(io::Error::from)
}

/// `FS_IOC_SETFLAGS` of `fd`.
pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    rustix::fs::ioctl_setflags(fd, rustix::fs::IFlags::from_bits_retain(flags))
        .map_err(io::Error::from)
}

/// `_IOR('X', 31, struct fsxattr)`.
pub const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;

/// Size of `struct fsxattr`, what `FS_IOC_FSGETXATTR` fills.
pub const FSXATTR_LEN: usize = 28;

/// `FS_IOC_FSGETXATTR` of `fd`: the extended inode flags, extent size hints and project id
/// (`struct fsxattr`), as raw bytes in the kernel's layout.
pub fn fs_xattr(fd: BorrowedFd<'_>) -> io::Result<[u8; FSXATTR_LEN]> {
    let mut raw = [0u8; FSXATTR_LEN];
    // SAFETY: FS_IOC_FSGETXATTR writes sizeof(struct fsxattr) = 28 bytes into `raw`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSGETXATTR, raw.as_mut_ptr()) };
    match rc {
        0 => Ok(raw),
        _ => Err(io::Error::last_os_error()),
    }
}

/// 16 random bytes (for the overlay instance UUID).
pub fn random_uuid() -> [u8; 16] {
    let mut b = [0u8; 16];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    // RFC 4122 version 4, variant 1, as the kernel's uuid_gen().
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// A `stat` with every field zero, for attributes made up rather than read (an entry that
/// no longer exists).
pub fn zeroed_stat() -> Stat {
    // SAFETY: `Stat` is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

/// `rm -rf PATH` for the launcher's and the image store's own directories: removes a file or
/// a whole tree without following symlinks, giving directories owner rwx on the way (layers
/// and the kernel's `work/work` hold directories without write permission). A missing path
/// is not an error.
pub fn remove_host_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = open_host_dir(parent)?;
    match stat_name(dir.as_fd(), name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    make_tree_writable(dir.as_fd(), name);
    remove_tree(dir.as_fd(), name)
}

/// Gives owner rwx to `name` in `dir` and every directory below it.
fn make_tree_writable(dir: BorrowedFd<'_>, name: &OsStr) {
    let Ok(st) = stat_name(dir, name) else {
        return;
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return;
    }
    let _ = chmod_name(dir, name, (st.st_mode & 0o7777) | 0o700);
    if let Ok(sub) = open_dir_path(dir, name) {
        if let Ok(entries) = read_dir(sub.as_fd()) {
            for e in entries {
                make_tree_writable(sub.as_fd(), &e.name);
            }
        }
    }
}
