//! READ replies spliced from the real file, where the kernel does not read it itself (no
//! passthrough: rootless mounts, `passthrough=off`).
//!
//! A READ answered from a buffer copies every byte twice: `pread` from the page cache into
//! the buffer, then `writev` from the buffer into the kernel's request. `splice` instead puts
//! the page cache's pages into a pipe by reference, and `/dev/fuse` copies them once, into the
//! request (fuse-overlayfs 1.10 replies so, through libfuse). The reply's header has to come
//! first in the pipe, but its length is known only once the file has given its bytes (fewer
//! than asked at the end of the file, or if it changes meanwhile). So each reader thread keeps
//! two pipes: the data is spliced into the first; the header is written into the second and
//! the data spliced after it (pipe to pipe moves page references, it copies nothing); the
//! second goes to `/dev/fuse` in one splice, which the kernel takes whole or not at all.
//!
//! Nothing here blocks: our pipes are spliced with `SPLICE_F_NONBLOCK`, and a READ larger
//! than a pipe holds is not spliced. On any failure the thread's pipes are dropped (they may
//! hold part of a reply; a new pair is made for the next READ) and the caller replies the
//! usual way.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use fuser::ReplyData;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};

/// Pipe size asked for: room for the largest READ the kernel sends (`max_pages`, 1 MiB)
/// would need more than an unprivileged process may have (`/proc/sys/fs/pipe-max-size`, 1 MiB
/// by default, holds 1 MiB only without the header), so READs up to what fits are spliced
/// (the kernel's readahead asks 128 KiB).
const PIPE_SIZE: usize = 1 << 20;

/// Size of `struct fuse_out_header`: length, error, unique.
const HEADER_LEN: usize = 16;

/// One reader thread's two pipes: (read end, write end) each.
struct Pipes {
    data: (OwnedFd, OwnedFd),
    reply: (OwnedFd, OwnedFd),
    /// The most data bytes one READ may splice through them: a page of each pipe's capacity
    /// is kept for the header and for a read that does not start on a page boundary.
    max_data: usize,
}

thread_local! {
    static PIPES: RefCell<Option<Pipes>> = const { RefCell::new(None) };
}

/// Replies to READ `reply` with up to `size` bytes of `file` from `offset` through the
/// thread's pipes. Gives the reply back, unsent, if it could not be spliced.
pub(super) fn reply_spliced(
    file: BorrowedFd<'_>,
    offset: u64,
    size: usize,
    reply: ReplyData,
) -> Result<(), ReplyData> {
    PIPES.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Err(reply);
        };
        if slot.is_none() {
            *slot = Pipes::new().ok();
        }
        let Some(pipes) = slot.as_ref() else {
            return Err(reply);
        };
        if size > pipes.max_data {
            return Err(reply);
        }
        let mut dirty = false;
        let res =
            reply.send_with(|dev, unique| pipes.send(file, offset, size, dev, unique, &mut dirty));
        match res {
            Ok(()) => Ok(()),
            Err((reply, e)) => {
                tracing::debug!(error = %e, "spliced READ reply failed, replying from a buffer");
                if dirty {
                    // They may hold part of this reply.
                    *slot = None;
                }
                Err(reply)
            }
        }
    })
}

impl Pipes {
    fn new() -> io::Result<Pipes> {
        let data = pipe_with(PipeFlags::CLOEXEC)?;
        let reply = pipe_with(PipeFlags::CLOEXEC)?;
        let mut capacity = usize::MAX;
        for (_, write) in [&data, &reply] {
            // Above pipe-max-size only with CAP_SYS_RESOURCE: then the default size it is.
            let _ = fcntl_setpipe_size(write, PIPE_SIZE);
            capacity = capacity.min(fcntl_getpipe_size(write)?);
        }
        let page = rustix::param::page_size();
        Ok(Pipes {
            data,
            reply,
            max_data: capacity.saturating_sub(2 * page),
        })
    }

    /// Splices the file's bytes and the header into the reply pipe and the reply pipe into
    /// `dev`; an error leaves nothing at the kernel, and sets `dirty` if the pipes may hold
    /// something.
    fn send(
        &self,
        file: BorrowedFd<'_>,
        mut offset: u64,
        size: usize,
        dev: BorrowedFd<'_>,
        unique: u64,
        dirty: &mut bool,
    ) -> io::Result<()> {
        // Never SPLICE_F_MOVE: /dev/fuse would try to steal the lower file's pages.
        let flags = SpliceFlags::NONBLOCK;
        let mut n = 0;
        while n < size {
            match rustix::pipe::splice(file, Some(&mut offset), &self.data.1, None, size - n, flags)
            {
                Ok(0) => break,
                Ok(k) => {
                    n += k;
                    *dirty = true;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        *dirty = true;
        let len = HEADER_LEN + n;
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&u32::try_from(len).map_err(io::Error::other)?.to_ne_bytes());
        header[8..].copy_from_slice(&unique.to_ne_bytes());
        if rustix::io::write(&self.reply.1, &header)? != HEADER_LEN {
            return Err(io::Error::other("short write of the reply header"));
        }
        move_all(self.data.0.as_fd(), self.reply.1.as_fd(), n, flags)?;
        // One message: /dev/fuse takes all of it or none.
        let sent = rustix::pipe::splice(&self.reply.0, None, dev, None, len, flags)?;
        if sent != len {
            return Err(io::Error::other(format!(
                "/dev/fuse took {sent} of {len} bytes"
            )));
        }
        Ok(())
    }
}

/// Splices exactly `len` bytes from pipe `from` to pipe `to`.
fn move_all(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
    flags: SpliceFlags,
) -> io::Result<()> {
    let mut moved = 0;
    while moved < len {
        match rustix::pipe::splice(from, None, to, None, len - moved, flags) {
            Ok(0) => return Err(io::Error::other("pipe emptied early")),
            Ok(k) => moved += k,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Content that shows where each byte came from.
    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Sends a READ reply of `file` into a pipe standing in for `/dev/fuse`; returns the
    /// header's length, error and unique, and the data.
    fn send_through(file: &std::fs::File, offset: u64, size: usize) -> (u32, i32, u64, Vec<u8>) {
        let pipes = Pipes::new().unwrap();
        let (dev_r, dev_w) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        fcntl_setpipe_size(&dev_w, PIPE_SIZE).unwrap();
        let mut dirty = false;
        pipes
            .send(file.as_fd(), offset, size, dev_w.as_fd(), 42, &mut dirty)
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
    fn the_pipes_hold_a_readahead_sized_read() {
        assert!(Pipes::new().unwrap().max_data >= 128 * 1024);
    }
}
