//! READ replies spliced from the real file, where the kernel does not read it itself (no
//! passthrough: rootless mounts, `passthrough=off`).
//!
//! A READ answered from a buffer copies every byte twice: `pread` from the page cache into
//! the buffer, then `writev` from the buffer into the kernel's request. `splice` instead puts
//! the page cache's pages into a pipe by reference, and `/dev/fuse` copies them once, into the
//! request (fuse-overlayfs 1.10 replies so, through libfuse). The reply's header goes into
//! the pipe first, so its length comes from `fstat` (the bytes from the offset to the end of
//! the file, at most the size asked); if the file then gives fewer (it shrank meanwhile), the
//! message is not sent. The pipe goes to `/dev/fuse` in one splice, which the kernel takes
//! whole or not at all.
//!
//! Each reader thread keeps one pipe, grown to the largest READ it has carried: a pipe's size
//! counts against its user's pipe allowance (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by
//! default; past it, every new pipe of that user is cut to two pages), which a rootless
//! daemon shares with its user's other programs. READs of 256 KiB (what the kernel's
//! readahead sends here) take 512 KiB pipes: 4 MiB for the 8 readers of a 2-CPU machine.
//! A READ that would need a pipe larger than `/proc/sys/fs/pipe-max-size` is not spliced.
//! Nor is one of less than [`SPLICE_FROM`] bytes: for a page or less, the copy that splicing
//! saves costs less than the two system calls it adds (`fstat` and the header's `write`:
//! four calls against `pread` and `writev`); libfuse draws the same line.
//!
//! Nothing here blocks: the pipe is spliced with `SPLICE_F_NONBLOCK` and always has room. On
//! any failure the thread's pipe is dropped if it may hold part of a reply (a new one is made
//! for the next READ) and the caller replies the usual way.

use std::cell::RefCell;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use fuser::ReplyData;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};

/// Size of `struct fuse_out_header`: length, error, unique.
const HEADER_LEN: usize = 16;

/// Smallest READ spliced: two pages, as libfuse (`fuse_send_data_iov`). Random 4 KiB reads
/// stay on the buffer path.
const SPLICE_FROM: usize = 8192;

/// One reader thread's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its size in bytes (`F_GETPIPE_SZ`).
    capacity: usize,
}

thread_local! {
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Replies to READ `reply` with up to `size` bytes of `file` from `offset` through the
/// thread's pipe. Gives the reply back, unsent, if it could not be spliced.
pub(super) fn reply_spliced(
    file: BorrowedFd<'_>,
    offset: u64,
    size: usize,
    reply: ReplyData,
) -> Result<(), ReplyData> {
    if size < SPLICE_FROM || !reply.can_send_with() {
        return Err(reply);
    }
    let Some(len) = bytes_to_send(file, offset, size) else {
        return Err(reply);
    };
    PIPE.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Err(reply);
        };
        if slot.is_none() {
            *slot = Pipe::new().ok();
        }
        let Some(pipe) = slot.as_mut() else {
            return Err(reply);
        };
        if pipe.make_room(len).is_err() {
            return Err(reply);
        }
        let mut dirty = false;
        let res =
            reply.send_with(|dev, unique| pipe.send(file, offset, len, dev, unique, &mut dirty));
        match res {
            Ok(()) => Ok(()),
            Err((reply, e)) => {
                tracing::debug!(error = %e, "spliced READ reply failed, replying from a buffer");
                if dirty {
                    // It may hold part of this reply.
                    *slot = None;
                }
                Err(reply)
            }
        }
    })
}

/// How many bytes a READ of `size` at `offset` returns: up to the end of the file.
fn bytes_to_send(file: BorrowedFd<'_>, offset: u64, size: usize) -> Option<usize> {
    let end = u64::try_from(rustix::fs::fstat(file).ok()?.st_size).ok()?;
    usize::try_from(end.saturating_sub(offset).min(size as u64)).ok()
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
        let capacity = fcntl_getpipe_size(&write)?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Grows the pipe, if need be, to hold the header and `len` bytes of a file: a page for
    /// the header, one per page of data, one more for a start inside a page.
    fn make_room(&mut self, len: usize) -> io::Result<()> {
        let page = rustix::param::page_size();
        let needed = (len.div_ceil(page) + 2) * page;
        if self.capacity < needed {
            // The kernel rounds up to a power of two pages; above pipe-max-size it refuses
            // (without CAP_SYS_RESOURCE).
            fcntl_setpipe_size(&self.write, needed)?;
            self.capacity = fcntl_getpipe_size(&self.write)?;
        }
        if self.capacity < needed {
            return Err(io::Error::other("pipe too small"));
        }
        Ok(())
    }

    /// Puts the header and `len` bytes of `file` from `offset` into the pipe and the pipe
    /// into `dev`; an error leaves nothing at the kernel, and sets `dirty` if the pipe may
    /// hold something.
    fn send(
        &self,
        file: BorrowedFd<'_>,
        mut offset: u64,
        len: usize,
        dev: BorrowedFd<'_>,
        unique: u64,
        dirty: &mut bool,
    ) -> io::Result<()> {
        // Never SPLICE_F_MOVE: /dev/fuse would try to steal the lower file's pages.
        let flags = SpliceFlags::NONBLOCK;
        let total = HEADER_LEN + len;
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(
            &u32::try_from(total)
                .map_err(io::Error::other)?
                .to_ne_bytes(),
        );
        header[8..].copy_from_slice(&unique.to_ne_bytes());
        *dirty = true;
        if rustix::io::write(&self.write, &header)? != HEADER_LEN {
            return Err(io::Error::other("short write of the reply header"));
        }
        let mut n = 0;
        while n < len {
            match rustix::pipe::splice(file, Some(&mut offset), &self.write, None, len - n, flags) {
                Ok(0) => return Err(io::Error::other("the file shrank under the read")),
                Ok(k) => n += k,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // One message: /dev/fuse takes all of it or none.
        let sent = rustix::pipe::splice(&self.read, None, dev, None, total, flags)?;
        if sent != total {
            return Err(io::Error::other(format!(
                "/dev/fuse took {sent} of {total} bytes"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    /// Content that shows where each byte came from.
    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Sends a READ reply of `file` into a pipe standing in for `/dev/fuse`; returns the
    /// header's length, error and unique, and the data.
    fn send_through(file: &std::fs::File, offset: u64, size: usize) -> (u32, i32, u64, Vec<u8>) {
        let len = bytes_to_send(file.as_fd(), offset, size).unwrap();
        let mut pipe = Pipe::new().unwrap();
        pipe.make_room(len).unwrap();
        let (dev_r, dev_w) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        fcntl_setpipe_size(&dev_w, pipe.capacity).unwrap();
        let mut dirty = false;
        pipe.send(file.as_fd(), offset, len, dev_w.as_fd(), 42, &mut dirty)
            .unwrap();
        drop(dev_w);
        let mut msg = Vec::new();
        std::fs::File::from(dev_r).read_to_end(&mut msg).unwrap();
        let word = |at: usize, n: usize| msg[at..at + n].to_vec();
        let len = u32::from_ne_bytes(word(0, 4).try_into().unwrap());
        let error = i32::from_ne_bytes(word(4, 4).try_into().unwrap());
        let unique = u64::from_ne_bytes(word(8, 8).try_into().unwrap());
        (len, error, unique, msg[HEADER_LEN..].to_vec())
    }

    #[test]
    fn a_spliced_reply_is_the_header_then_exactly_the_bytes_read() {
        let data = content(300_000);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        // Unaligned, in the middle.
        let (len, error, unique, got) = send_through(&file, 4097, 128 * 1024);
        assert_eq!(
            (len as usize, error, unique),
            (HEADER_LEN + 128 * 1024, 0, 42)
        );
        assert!(got == data[4097..4097 + 128 * 1024]);
        // Across the end of the file: fewer bytes, and the header says so.
        let (len, _, _, got) = send_through(&file, 290_000, 128 * 1024);
        assert_eq!(len as usize, HEADER_LEN + 10_000);
        assert!(got == data[290_000..]);
        // Past the end: an empty reply.
        let (len, _, _, got) = send_through(&file, 400_000, 4096);
        assert_eq!((len as usize, got.len()), (HEADER_LEN, 0));
    }

    #[test]
    fn the_pipe_grows_to_the_largest_read_and_refuses_what_it_cannot_hold() {
        let mut pipe = Pipe::new().unwrap();
        let first = pipe.capacity;
        pipe.make_room(256 * 1024).unwrap();
        assert!(pipe.capacity >= 256 * 1024 + 2 * rustix::param::page_size());
        assert!(pipe.capacity > first);
        let grown = pipe.capacity;
        pipe.make_room(4096).unwrap();
        assert_eq!(pipe.capacity, grown, "never shrinks back");
        assert!(pipe.make_room(1 << 40).is_err());
    }
}
