//! One traced wrapper per syscall that changes the upper layer or the workdir (kernel
//! `ovl_do_*` in `overlayfs.h`), so `RUST_LOG=stratafs::upper=debug` shows everything done to
//! them, and every failure carries the operation's name.

use std::ffi::OsStr;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::OFlags;
use tracing::debug;

use crate::error::{Error, Result};
use crate::sys;
use crate::sys::fs::TimeSpec;

const T: &str = "stratafs::upper";

/// `mkdirat`.
pub fn do_mkdir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    debug!(target: T, op = "mkdir", ?name, mode = format_args!("{mode:o}"));
    sys::fs::make_dir(dir, name, mode).map_err(|e| Error::io("mkdir", e))
}

/// `mknodat` (also fifos and sockets).
pub fn do_mknod(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> Result<()> {
    debug!(target: T, op = "mknod", ?name, mode = format_args!("{mode:o}"), rdev);
    sys::fs::make_node(dir, name, mode, rdev).map_err(|e| Error::io("mknod", e))
}

/// `openat2(O_CREAT | O_EXCL)`.
pub fn do_create(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags, mode: u32) -> Result<OwnedFd> {
    debug!(target: T, op = "create", ?name, mode = format_args!("{mode:o}"));
    sys::fs::create_file(dir, name, flags, mode).map_err(|e| Error::io("create", e))
}

/// `symlinkat`.
pub fn do_symlink(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    debug!(target: T, op = "symlink", ?name, ?target);
    sys::fs::make_symlink(target, dir, name).map_err(|e| Error::io("symlink", e))
}

/// `linkat`.
pub fn do_link(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
) -> Result<()> {
    debug!(target: T, op = "link", ?oldname, ?newname);
    sys::fs::link(olddir, oldname, newdir, newname).map_err(|e| Error::io("link", e))
}

/// `unlinkat` of a non-directory.
pub fn do_unlink(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    debug!(target: T, op = "unlink", ?name);
    sys::fs::unlink(dir, name, false).map_err(|e| Error::io("unlink", e))
}

/// `unlinkat(AT_REMOVEDIR)`.
pub fn do_rmdir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    debug!(target: T, op = "rmdir", ?name);
    sys::fs::unlink(dir, name, true).map_err(|e| Error::io("rmdir", e))
}

/// Removes `name` and everything below it (temporary objects in the workdir).
pub fn do_remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    debug!(target: T, op = "remove_tree", ?name);
    sys::fs::remove_tree(dir, name).map_err(|e| Error::io("cleanup", e))
}

/// `renameat2` with raw `RENAME_*` flags.
pub fn do_rename(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> Result<()> {
    debug!(target: T, op = "rename", ?oldname, ?newname, flags);
    sys::fs::rename(olddir, oldname, newdir, newname, flags).map_err(|e| Error::io("rename", e))
}

/// `setxattr` on the object behind an `O_PATH` fd.
pub fn do_setxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: u32) -> Result<()> {
    debug!(target: T, op = "setxattr", ?name, len = value.len());
    sys::fs::set_xattr(fd, name, value, flags).map_err(|e| Error::io("setxattr", e))
}

/// `FS_IOC_SETFLAGS` on an open file or directory.
pub fn do_set_inode_flags(fd: BorrowedFd<'_>, flags: u32) -> Result<()> {
    debug!(target: T, op = "setflags", flags = format_args!("{flags:#x}"));
    sys::fs::set_inode_flags(fd, flags).map_err(|e| Error::io("setflags", e))
}

/// `removexattr` on the object behind an `O_PATH` fd.
pub fn do_removexattr(fd: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    debug!(target: T, op = "removexattr", ?name);
    sys::fs::remove_xattr(fd, name).map_err(|e| Error::io("removexattr", e))
}

/// `fchownat(AT_SYMLINK_NOFOLLOW)`.
pub fn do_chown(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    debug!(target: T, op = "chown", ?name, ?uid, ?gid);
    sys::fs::chown_name(dir, name, uid, gid).map_err(|e| Error::io("chown", e))
}

/// `fchmodat`.
pub fn do_chmod(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    debug!(target: T, op = "chmod", ?name, mode = format_args!("{mode:o}"));
    sys::fs::chmod_name(dir, name, mode).map_err(|e| Error::io("chmod", e))
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`.
pub fn do_utimes(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> Result<()> {
    debug!(target: T, op = "utimes", ?name, ?atime, ?mtime);
    sys::fs::set_times(dir, name, atime, mtime).map_err(|e| Error::io("utimes", e))
}

/// `ftruncate`.
pub fn do_truncate(fd: BorrowedFd<'_>, size: u64) -> Result<()> {
    debug!(target: T, op = "truncate", size);
    rustix::fs::ftruncate(fd, size).map_err(|e| Error::io("truncate", e.into()))
}

/// chown of the object behind an `O_PATH` fd.
pub fn do_chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    debug!(target: T, op = "chown", ?uid, ?gid);
    sys::fs::chown_fd(fd, uid, gid).map_err(|e| Error::io("chown", e))
}

/// chmod of the object behind an `O_PATH` fd.
pub fn do_chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    debug!(target: T, op = "chmod", mode = format_args!("{mode:o}"));
    sys::fs::chmod_fd(fd, mode).map_err(|e| Error::io("chmod", e))
}

/// utimensat of the object behind an `O_PATH` fd (`AT_EMPTY_PATH`).
pub fn do_utimes_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> Result<()> {
    debug!(target: T, op = "utimes", ?atime, ?mtime);
    sys::fs::set_times_fd(fd, atime, mtime).map_err(|e| Error::io("utimes", e))
}

/// Links the object behind an `O_PATH` fd under a new name.
pub fn do_link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> Result<()> {
    debug!(target: T, op = "link", ?newname);
    sys::fs::link_fd(fd, newdir, newname).map_err(|e| Error::io("link", e))
}
