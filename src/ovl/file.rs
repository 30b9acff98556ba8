//! Open files and their I/O (kernel `fs/overlayfs/file.c`).
//!
//! An open file holds a descriptor on the real file of the top layer, opened fd-relative from
//! the real parent directory without following symlinks.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustix::fs::{FileType, OFlags};

use crate::error::{Error, Result};
use crate::ovl::Overlay;
use crate::ovl::inode::Node;
use crate::sys;

/// An open file.
#[derive(Debug)]
struct OpenFile {
    fd: OwnedFd,
}

/// Open files by handle number.
#[derive(Debug, Default)]
pub struct FileTable {
    map: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next: AtomicU64,
}

/// Open flags that would change the file: they need the write side.
fn wants_write(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
}

impl Overlay {
    /// Opens `node` with the caller's `open(2)` flags and returns a handle number.
    pub fn open(&self, node: &Node, flags: i32) -> Result<u64> {
        if wants_write(flags) {
            self.want_write()?;
        }
        if node.file_type == FileType::Directory {
            return Err(Error::io(
                "open",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        let top = node.top()?;
        let (parent, name) = self.real_parent(node, top.layer)?;
        // Keep only flags that affect reading; lower files never get their atime updated
        // (overlayfs.rst, "Non-standard behavior").
        let keep = OFlags::from_bits_retain((flags & (libc::O_NONBLOCK | libc::O_DIRECT)) as u32);
        let base = OFlags::RDONLY | keep;
        let fd = match sys::fs::open_beneath(parent.as_fd(), &name, base | OFlags::NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                sys::fs::open_beneath(parent.as_fd(), &name, base)
            }
            other => other,
        }
        .map_err(|e| Error::io("open", e))?;
        let fh = self.files.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.files
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(OpenFile { fd }));
        Ok(fh)
    }

    /// Reads up to `size` bytes at `offset` from handle `fh`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::fs::pread_full(file.fd.as_fd(), &mut buf, offset)
            .map_err(|e| Error::io("read", e))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Closes handle `fh`.
    pub fn release(&self, fh: u64) {
        self.files
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Error::BadHandle(fh))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_flags() {
        assert!(!wants_write(libc::O_RDONLY));
        assert!(wants_write(libc::O_WRONLY));
        assert!(wants_write(libc::O_RDWR));
        assert!(wants_write(libc::O_RDONLY | libc::O_TRUNC));
        assert!(wants_write(libc::O_RDONLY | libc::O_APPEND));
    }
}
