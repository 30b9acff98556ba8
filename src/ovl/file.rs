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
use crate::ovl::layer::LayerIdx;
use crate::sys;

/// An open file.
#[derive(Debug)]
struct OpenFile {
    /// The real file, and the layer it was opened in.
    real: RwLock<(Arc<OwnedFd>, LayerIdx)>,
    /// The node, to notice a copy-up that happened since the open.
    node: Arc<Node>,
    /// The access flags of the open (to reopen the same way after a copy-up).
    flags: OFlags,
}

impl OpenFile {
    /// Whether the caller opened with `O_DIRECT`, which the real file was opened with too.
    fn direct(&self) -> bool {
        self.flags.contains(OFlags::DIRECT)
    }
}

/// Open files by handle number.
#[derive(Debug, Default)]
pub struct FileTable {
    map: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next: AtomicU64,
}

/// Open flags that would change the file: they need the write side.
pub fn wants_write(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
}

impl Overlay {
    /// Opens `node` with the caller's `open(2)` flags and returns a handle number. Opening for
    /// write copies the file up first, even if nothing is ever written (overlayfs.rst).
    pub fn open(&self, node: &Arc<Node>, flags: i32) -> Result<u64> {
        if node.file_type == FileType::Directory {
            return Err(Error::io(
                "open",
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        let write = wants_write(flags);
        if write {
            self.copy_up_data(node)?;
        }
        let acc = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => OFlags::WRONLY,
            libc::O_RDWR => OFlags::RDWR,
            _ => OFlags::RDONLY,
        };
        // O_APPEND stays with the kernel, which sends explicit offsets; O_TRUNC arrives as a
        // separate setattr.
        let keep = OFlags::from_bits_retain(
            (flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC)) as u32,
        );
        let oflags = acc | keep;
        let (fd, layer) = self.open_real(node, oflags)?;
        Ok(self.add_handle(node, fd, layer, oflags))
    }

    /// Registers an already open real file (from create) as a handle.
    pub fn add_handle(&self, node: &Arc<Node>, fd: OwnedFd, layer: LayerIdx, flags: OFlags) -> u64 {
        let fh = self.files.next.fetch_add(1, Ordering::Relaxed) + 1;
        let file = OpenFile {
            real: RwLock::new((Arc::new(fd), layer)),
            node: node.clone(),
            flags,
        };
        self.files
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(file));
        fh
    }

    /// Opens the top real file of `node`; lower files are never written and never get their
    /// atime updated (overlayfs.rst, "Non-standard behavior").
    fn open_real(&self, node: &Node, flags: OFlags) -> Result<(OwnedFd, LayerIdx)> {
        let ro = flags & OFlags::RWMODE == OFlags::RDONLY;
        // Reads of a metadata-only copy come from the lower data file.
        let top = if ro { node.data_real()? } else { node.top()? };
        let detached = {
            let st = node.state();
            match ro && st.metacopy {
                // The upper object of a metadata-only copy holds no data, however it is
                // reached: reads go to the lower data file.
                true => None,
                false => st.detached.clone().or_else(|| st.index_copy.clone()),
            }
        };
        if let Some(fd) = detached {
            let f = sys::fs::reopen(fd.as_fd(), flags).map_err(|e| Error::io("open", e))?;
            return Ok((f, top.layer));
        }
        let (parent, name) = self.real_parent(node, top.layer)?;
        let fd = match ro {
            true => match sys::fs::open_beneath(parent.as_fd(), &name, flags | OFlags::NOATIME) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    sys::fs::open_beneath(parent.as_fd(), &name, flags)
                }
                other => other,
            },
            false => sys::fs::open_beneath(parent.as_fd(), &name, flags),
        }
        .map_err(|e| Error::io("open", e))?;
        Ok((fd, top.layer))
    }

    /// The real descriptor behind handle `fh`, reopened on the upper copy if the file was
    /// copied up after this handle was opened (kernel `ovl_real_fdget`), so a read-only handle
    /// sees what other handles wrote.
    pub fn handle_fd(&self, fh: u64) -> Result<Arc<OwnedFd>> {
        self.handle_real(fh).map(|(fd, _)| fd)
    }

    /// [`Overlay::handle_fd`] and the layer the real file is in.
    pub fn handle_real(&self, fh: u64) -> Result<(Arc<OwnedFd>, LayerIdx)> {
        self.real_of(&*self.file(fh)?)
    }

    /// The real descriptor of `file` and its layer, reopened after a copy-up.
    fn real_of(&self, file: &OpenFile) -> Result<(Arc<OwnedFd>, LayerIdx)> {
        let (fd, layer) = file.real.read().unwrap_or_else(|e| e.into_inner()).clone();
        let top = file.node.data_real()?;
        if top.layer == layer || file.node.state().detached.is_some() {
            return Ok((fd, layer));
        }
        let (new, layer) = self.open_real(&file.node, file.flags)?;
        let new = Arc::new(new);
        *file.real.write().unwrap_or_else(|e| e.into_inner()) = (new.clone(), layer);
        Ok((new, layer))
    }

    /// Reads up to `size` bytes at `offset` from handle `fh` and hands them, or the error,
    /// to `reply`.
    ///
    /// The bytes land in a buffer the calling thread keeps ([`with_io_buffer`]): a fresh
    /// 128 KiB buffer per READ cost the rootless read path a heap trim and 32 page faults
    /// per request (README, "Reads without passthrough").
    pub fn read_with<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(Result<&[u8]>) -> R,
    ) -> R {
        let (fd, direct) = match self
            .file(fh)
            .and_then(|f| Ok((self.real_of(&f)?.0, f.direct())))
        {
            Ok(found) => found,
            Err(e) => return reply(Err(e)),
        };
        with_io_buffer(size as usize, |buf| {
            // A direct read that comes back short ended at the end of the file; reading on
            // from there would start at an unaligned offset, which O_DIRECT refuses.
            let read = match direct {
                true => sys::fs::pread_once(fd.as_fd(), buf, offset),
                false => sys::fs::pread_full(fd.as_fd(), buf, offset),
            };
            match read {
                Ok(n) => reply(Ok(&buf[..n])),
                Err(e) => reply(Err(Error::io("read", e))),
            }
        })
    }

    /// Writes `data` at `offset` through handle `fh`. For a handle opened with `O_DIRECT`
    /// the bytes are first copied to a page-aligned buffer: they arrive 80 bytes into the
    /// request, and the real filesystem refuses direct I/O from an unaligned address
    /// (`EINVAL`), where kernel overlayfs would have passed the caller's aligned buffer on.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let file = self.file(fh)?;
        let (fd, _) = self.real_of(&file)?;
        let res = match file.direct() {
            true => with_io_buffer(data.len(), |buf| {
                buf.copy_from_slice(data);
                sys::fs::pwrite_all(fd.as_fd(), buf, offset)
            }),
            false => sys::fs::pwrite_all(fd.as_fd(), data, offset),
        };
        res.map_err(|e| Error::io("write", e))
    }

    /// fsync/fdatasync of handle `fh`; a no-op with `fsync=0`/`volatile`.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        if !self.cfg.fsync {
            return Ok(());
        }
        let fd = self.handle_fd(fh)?;
        let res = if datasync {
            rustix::fs::fdatasync(&*fd)
        } else {
            rustix::fs::fsync(&*fd)
        };
        res.map_err(|e| Error::io("fsync", e.into()))
    }

    /// fallocate(2) on handle `fh` with the caller's mode bits.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let fd = self.handle_fd(fh)?;
        let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(&*fd, mode, offset, length)
            .map_err(|e| Error::io("fallocate", e.into()))
    }

    /// lseek with SEEK_DATA/SEEK_HOLE (the kernel handles SEEK_SET/CUR/END itself).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let fd = self.handle_fd(fh)?;
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            _ => rustix::fs::SeekFrom::Current(offset),
        };
        rustix::fs::seek(&*fd, pos)
            .map(|p| p as i64)
            .map_err(|e| Error::io("lseek", e.into()))
    }

    /// copy_file_range between two handles, in the upper layer.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<usize> {
        let src = self.handle_fd(fh_in)?;
        let dst = self.handle_fd(fh_out)?;
        let (mut i, mut o) = (off_in, off_out);
        rustix::fs::copy_file_range(&*src, Some(&mut i), &*dst, Some(&mut o), len as usize)
            .map_err(|e| Error::io("copy_file_range", e.into()))
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

/// Largest I/O buffer a thread keeps between requests: the kernel's readahead asks for
/// 128 KiB at a time, and 32 readers keeping 256 KiB each stay within 8 MiB. Larger requests
/// (direct I/O asks for up to `max_read`/`max_write`) get a buffer of their own.
const IO_BUFFER_KEPT: usize = 256 << 10;

/// Alignment of the buffers handed out by [`with_io_buffer`]: a page satisfies the logical
/// block size of any real filesystem a file opened with `O_DIRECT` may be on.
const IO_BUFFER_ALIGN: usize = 4096;

thread_local! {
    /// This thread's I/O buffer, zeroed once when it grows.
    static IO_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `fill` on a page-aligned buffer of exactly `size` bytes: inside this thread's kept
/// one when `size` is at most [`IO_BUFFER_KEPT`], else inside a new one.
fn with_io_buffer<R>(size: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
    if size > IO_BUFFER_KEPT {
        return fill(aligned(&mut Vec::new(), size));
    }
    IO_BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => fill(aligned(&mut buf, size)),
        // Only if `fill` itself read through here again (it does not): never share.
        Err(_) => fill(aligned(&mut Vec::new(), size)),
    })
}

/// `size` bytes of `buf` starting at an [`IO_BUFFER_ALIGN`]-aligned address; a `buf` too
/// small is replaced (its content does not matter) by a zeroed one from `calloc`, whose
/// pages are touched only when used.
fn aligned(buf: &mut Vec<u8>, size: usize) -> &mut [u8] {
    if buf.len() < size + IO_BUFFER_ALIGN {
        *buf = vec![0u8; size + IO_BUFFER_ALIGN];
    }
    let start = buf.as_ptr().align_offset(IO_BUFFER_ALIGN);
    &mut buf[start..start + size]
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

    #[test]
    fn io_buffer_is_aligned_has_the_asked_length_and_is_kept_up_to_the_limit() {
        let addr = |buf: &mut [u8]| (buf.as_ptr() as usize, buf.len());
        let (first, len) = with_io_buffer(4096, |buf| {
            buf.fill(7);
            addr(buf)
        });
        assert_eq!(len, 4096);
        assert_eq!(first % IO_BUFFER_ALIGN, 0);
        // A shorter request gets exactly its length, from the same memory.
        assert_eq!(with_io_buffer(100, addr), (first, 100));
        // Growing keeps what is kept at most; a bigger request gets its own buffer.
        let (kept_at, kept) = with_io_buffer(IO_BUFFER_KEPT, addr);
        assert_eq!(kept, IO_BUFFER_KEPT);
        assert_eq!(kept_at % IO_BUFFER_ALIGN, 0);
        let (own, big) = with_io_buffer(IO_BUFFER_KEPT + 1, addr);
        assert_eq!(big, IO_BUFFER_KEPT + 1);
        assert_eq!(own % IO_BUFFER_ALIGN, 0);
        assert_ne!(own, with_io_buffer(10, addr).0);
    }
}
