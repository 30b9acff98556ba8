//! Inode flags as `lsattr` reads them (kernel `ovl_fileattr_get`): the flags of the real
//! object the merged one shows, upper if it has been copied up, else the lower one. A
//! copy-up carries the synchronous-write and no-atime flags over (kernel
//! `ovl_copy_fileattr`).
//!
//! The kernel asks FUSE for them with an ioctl (`FS_IOC_GETFLAGS`, or `FS_IOC_FSGETXATTR`
//! for the `fsxattr` form) on a file it opens for the purpose; only regular files and
//! directories have them on FUSE. Setting flags (`chattr`) is not supported: kernel
//! overlayfs keeps the immutable and append-only flags in an `overlay.protattr` attribute
//! and enforces them itself, which stratafs does not do (fuse-overlayfs 1.10 also reads
//! flags only; 2.0 answers neither).

use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{FileType, OFlags};

use crate::error::{Error, Result};
use crate::ovl::inode::Node;
use crate::ovl::{Overlay, vfs};
use crate::sys;

/// Inode flags a copy-up carries over (kernel `OVL_COPY_FS_FLAGS_MASK`): `FS_SYNC_FL` and
/// `FS_NOATIME_FL`, which change how the file behaves, not what it holds.
const COPIED_FLAGS: u32 = 0x0000_0008 | 0x0000_0080;

/// The two forms of the flags the kernel asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAttrForm {
    /// `FS_IOC_GETFLAGS`: a 32-bit `FS_*_FL` word.
    Flags,
    /// `FS_IOC_FSGETXATTR`: a `struct fsxattr`.
    FsXattr,
}

impl FileAttrForm {
    /// The form an ioctl command of a FUSE_IOCTL request asks for, None for any other
    /// command.
    pub fn of_ioctl(cmd: u32) -> Option<FileAttrForm> {
        match libc::c_ulong::from(cmd) {
            c if c == libc::FS_IOC_GETFLAGS as libc::c_ulong => Some(FileAttrForm::Flags),
            sys::fs::FS_IOC_FSGETXATTR => Some(FileAttrForm::FsXattr),
            _ => None,
        }
    }
}

impl Overlay {
    /// The flags of `node`'s real object in `form`, as the bytes of the ioctl's reply.
    /// `ENOTTY` for objects that have none (what the kernel answers for them).
    pub fn fileattr_get(&self, node: &Node, form: FileAttrForm) -> Result<Vec<u8>> {
        let mode = open_mode(node.file_type).ok_or_else(no_flags)?;
        // The ioctl needs an open file, not the O_PATH handle we keep; no data is read.
        let real = sys::fs::reopen(self.real_path_fd(node)?.as_fd(), mode)
            .map_err(|e| Error::io("fileattr open", e))?;
        let bytes = match form {
            FileAttrForm::Flags => {
                sys::fs::inode_flags(real.as_fd()).map(|f| f.to_ne_bytes().to_vec())
            }
            FileAttrForm::FsXattr => sys::fs::fs_xattr(real.as_fd()).map(|x| x.to_vec()),
        };
        bytes.map_err(|e| Error::io("fileattr", e))
    }
}

/// Gives the copy-up `dst` (an `O_PATH` handle in the workdir) the [`COPIED_FLAGS`] that
/// `src` has, keeping its other flags. Best effort: a filesystem without inode flags on
/// either side (`ENOTTY`, `EINVAL`, `EOPNOTSUPP`) is skipped as the kernel skips it, and any
/// other failure is logged rather than failing the copy-up over a flag.
pub(crate) fn copy_flags(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, file_type: FileType) {
    let Some(mode) = open_mode(file_type) else {
        return;
    };
    let res = (|| -> Result<()> {
        let flags_of =
            |fd: BorrowedFd<'_>| sys::fs::inode_flags(fd).map_err(|e| Error::io("getflags", e));
        let src = sys::fs::reopen(src, mode).map_err(|e| Error::io("fileattr open", e))?;
        let wanted = flags_of(src.as_fd())? & COPIED_FLAGS;
        if wanted == 0 {
            return Ok(());
        }
        let dst = sys::fs::reopen(dst, mode).map_err(|e| Error::io("fileattr open", e))?;
        let flags = flags_of(dst.as_fd())?;
        vfs::do_set_inode_flags(dst.as_fd(), (flags & !COPIED_FLAGS) | wanted)
    })();
    match res {
        Ok(()) => {}
        Err(e) if matches!(e.errno(), libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) => {}
        Err(e) => tracing::warn!(error = %e, "copy-up: inode flags not carried over"),
    }
}

/// How to open an object of `file_type` for the flag ioctls, which need an open file (not
/// the `O_PATH` handles kept): None for types without inode flags on FUSE.
fn open_mode(file_type: FileType) -> Option<OFlags> {
    match file_type {
        FileType::RegularFile => Some(OFlags::RDONLY | OFlags::NONBLOCK),
        FileType::Directory => Some(OFlags::RDONLY | OFlags::DIRECTORY),
        _ => None,
    }
}

fn no_flags() -> Error {
    Error::io("fileattr", std::io::Error::from_raw_os_error(libc::ENOTTY))
}
