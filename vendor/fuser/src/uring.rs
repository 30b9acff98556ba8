//! FUSE over io_uring (stratafs patch; Linux 6.14+, with the `fuse.enable_uring` module
//! parameter on).
//!
//! Instead of reading `/dev/fuse`, each worker thread keeps a ring entry (a header buffer
//! and a payload buffer) registered with one of the kernel's per-CPU request queues through
//! an `IORING_OP_URING_CMD`. The kernel queues a request on the queue of the CPU its caller
//! runs on, fills an entry's buffers and completes its command; the worker answers into
//! the same buffers and hands them back with `COMMIT_AND_FETCH`, which also waits for the
//! next request. Workers are pinned to their queue's CPU, so caller and worker meet on one
//! CPU: no cross-CPU wake-up per request. FORGET and INTERRUPT still come through
//! `/dev/fuse`, read by the usual session threads.
//!
//! Layouts follow `include/uapi/linux/fuse.h` (`struct fuse_uring_req_header`,
//! `struct fuse_uring_cmd_req`) and `fs/fuse/dev_uring.c`.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::reply::ReplyEmpty;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `FUSE_IO_URING_CMD_REGISTER`: register an entry's buffers, then wait for a request.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: answer the entry's request, then wait for the next.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `FUSE_URING_IN_OUT_HEADER_SZ` and `FUSE_URING_OP_IN_OUT_SZ`.
const IN_OUT_SZ: usize = 128;
const OP_IN_SZ: usize = 128;
/// `sizeof(struct fuse_in_header)` and `sizeof(struct fuse_out_header)`.
const IN_HEADER_SZ: usize = 40;
const OUT_HEADER_SZ: usize = 16;
/// The kernel's smallest payload buffer (`FUSE_MIN_READ_BUFFER`).
const MIN_PAYLOAD: usize = 8192;
/// Offset of the `len` field of an `io_uring_sqe`, which must hold the iovec count.
const SQE_LEN_OFFSET: usize = 24;
/// Submission queue size of a worker's ring (it has one command in flight at a time).
const SQ_ENTRIES: u32 = 4;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C, align(8))]
struct ReqHeader {
    in_out: [u8; IN_OUT_SZ],
    op_in: [u8; OP_IN_SZ],
    ent: EntInOut,
}

/// The size of the payload buffer the kernel requires of each entry:
/// `max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)` (`fuse_uring_create`).
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let page = page_size::get();
    MIN_PAYLOAD
        .max(max_write as usize)
        .max(max_pages as usize * page)
}

/// Whether the kernel allows FUSE over io_uring (`/sys/module/fuse/parameters/enable_uring`).
pub fn kernel_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim() == "Y" || s.trim() == "1")
        .unwrap_or(false)
}

/// The CPUs the kernel makes queues for (`num_possible_cpus()`), from
/// `/sys/devices/system/cpu/possible` ("0-3", "0,2-5").
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0usize;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("cpu list {text:?}"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        count = count.max(b.checked_add(1).ok_or_else(bad)?);
        if b < a {
            return Err(bad());
        }
    }
    Ok(count)
}

/// One ring entry's buffers, shared with the kernel. Only ever accessed through raw
/// pointers, by one party at a time: the kernel writes a request into them while the
/// worker waits, the worker reads it, and the reply sender writes the answer while the
/// worker waits for it (see [`Slot`]).
struct EntryBufs {
    header: *mut ReqHeader,
    payload: *mut u8,
    payload_len: usize,
    iov: Box<[libc::iovec; 2]>,
}

// SAFETY: see above: accesses take turns, ordered by the ring's system calls and the slot's
// lock.
unsafe impl Send for EntryBufs {}
unsafe impl Sync for EntryBufs {}

impl EntryBufs {
    fn new(payload_len: usize) -> EntryBufs {
        let header = Box::into_raw(Box::new(ReqHeader {
            in_out: [0; IN_OUT_SZ],
            op_in: [0; OP_IN_SZ],
            ent: EntInOut::default(),
        }));
        let payload = Box::into_raw(vec![0u8; payload_len].into_boxed_slice()) as *mut u8;
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: size_of::<ReqHeader>(),
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            },
        ]);
        EntryBufs {
            header,
            payload,
            payload_len,
            iov,
        }
    }
}

impl Drop for EntryBufs {
    fn drop(&mut self) {
        // SAFETY: both come from Box::into_raw in `new`, with these sizes.
        unsafe {
            drop(Box::from_raw(self.header));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.payload,
                self.payload_len,
            )));
        }
    }
}

/// Whether the request a worker serves has been answered; the worker waits on it before
/// committing, since a handler may answer from another thread.
struct Slot {
    answered: Mutex<bool>,
    changed: Condvar,
}

/// The reply sender of a request that came through a ring: writes the reply into the
/// entry's buffers (out header into the header's `in_out`, the rest into the payload).
#[derive(Clone)]
pub(crate) struct UringSender {
    ch: ChannelSender,
    bufs: Arc<EntryBufs>,
    slot: Arc<Slot>,
}

impl std::fmt::Debug for UringSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringSender")
    }
}

impl UringSender {
    /// The `/dev/fuse` channel, for backing-file ioctls.
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.ch
    }

    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut answered = lock(&self.slot.answered);
        if *answered {
            return Err(io::Error::other("request answered twice"));
        }
        let bufs = &*self.bufs;
        let total: usize = data.iter().map(|d| d.len()).sum();
        if total < OUT_HEADER_SZ || total - OUT_HEADER_SZ > bufs.payload_len {
            return Err(io::Error::other(format!(
                "reply of {total} bytes does not fit"
            )));
        }
        let mut written = 0usize;
        for piece in data {
            let mut src: &[u8] = piece;
            // SAFETY: the header has IN_OUT_SZ >= OUT_HEADER_SZ bytes of in_out, the payload
            // payload_len bytes (checked above); the worker waits while we write.
            unsafe {
                if written < OUT_HEADER_SZ {
                    let n = src.len().min(OUT_HEADER_SZ - written);
                    let dst = (&raw mut (*bufs.header).in_out).cast::<u8>().add(written);
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n);
                    written += n;
                    src = &src[n..];
                }
                if !src.is_empty() {
                    let at = written - OUT_HEADER_SZ;
                    std::ptr::copy_nonoverlapping(src.as_ptr(), bufs.payload.add(at), src.len());
                    written += src.len();
                }
            }
        }
        // SAFETY: as above.
        unsafe {
            (*bufs.header).ent.payload_sz = (total - OUT_HEADER_SZ) as u32;
        }
        *answered = true;
        self.slot.changed.notify_all();
        Ok(())
    }
}

/// Serves queue `qid` (the CPU of that number) until the connection ends: registers one
/// ring entry and answers the requests the kernel puts in it.
pub(crate) fn serve_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    qid: u16,
    payload_len: usize,
) -> io::Result<()> {
    pin_to_cpu(qid as usize);
    // Declared before the ring, so dropped after it: the kernel may use them until then.
    let bufs = Arc::new(EntryBufs::new(payload_len));
    let slot = Arc::new(Slot {
        answered: Mutex::new(true),
        changed: Condvar::new(),
    });
    // One thread submits and reaps (single issuer), and the kernel's work for it runs when it
    // waits (deferred task work), not by interrupting it; older kernels get a plain ring.
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(SQ_ENTRIES)
    {
        Ok(r) => r,
        Err(_) => IoUring::builder().build(SQ_ENTRIES)?,
    };
    let fd = types::Fd(se.ch.as_fd().as_raw_fd());
    let sender = UringSender {
        ch: se.ch.sender(),
        bufs: bufs.clone(),
        slot: slot.clone(),
    };
    // Room for the request put back together as /dev/fuse would deliver it, aligned for
    // fuse_in_header.
    let mut request = vec![0u64; (IN_HEADER_SZ + OP_IN_SZ + payload_len).div_ceil(8)];
    let iov = bufs.iov.as_ptr() as u64;
    push(&mut ring, command(fd, CMD_REGISTER, 0, qid, iov))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        let res = cqe.result();
        if res < 0 {
            let err = -res;
            if matches!(err, libc::ENOTCONN | libc::ECANCELED | libc::ENODEV) {
                debug!("io_uring queue {qid}: connection ended ({err})");
                return Ok(());
            }
            return Err(io::Error::from_raw_os_error(err));
        }
        // SAFETY: the kernel filled the header before completing the command.
        let ent = unsafe { std::ptr::read(&raw const (*bufs.header).ent) };
        let len = assemble(&bufs, &ent, &mut request);
        *lock(&slot.answered) = false;
        let bytes = as_bytes(&request);
        match len.and_then(|n| {
            RequestWithSender::new_with(ReplySender::Uring(sender.clone()), &bytes[..n])
        }) {
            Some(req) => {
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
            None => {
                error!("io_uring queue {qid}: malformed request");
                answer_error(&sender, ent.commit_id, libc::EIO);
            }
        }
        // A handler that keeps its reply answers from another thread (or drops it, which
        // answers EIO): wait for that.
        let mut answered = lock(&slot.answered);
        while !*answered {
            answered = slot
                .changed
                .wait(answered)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(answered);
        push(
            &mut ring,
            command(fd, CMD_COMMIT_AND_FETCH, ent.commit_id, qid, iov),
        )?;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: any u64 slice is a valid byte slice of 8 times its length.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
}

/// Puts the request in `bufs` back together as `/dev/fuse` delivers it: in header, op
/// header, payload. Its length, or None if the sizes do not add up.
fn assemble(bufs: &EntryBufs, ent: &EntInOut, out: &mut [u64]) -> Option<usize> {
    // SAFETY: reads the header the kernel filled (the worker's turn).
    let in_out: [u8; IN_OUT_SZ] = unsafe { std::ptr::read(&raw const (*bufs.header).in_out) };
    let total = u32::from_ne_bytes(in_out[..4].try_into().ok()?) as usize;
    let payload = ent.payload_sz as usize;
    let op = total.checked_sub(IN_HEADER_SZ)?.checked_sub(payload)?;
    if op > OP_IN_SZ || payload > bufs.payload_len || total > out.len() * 8 {
        return None;
    }
    let dst: *mut u8 = out.as_mut_ptr().cast();
    // SAFETY: sizes checked against both sides above.
    unsafe {
        std::ptr::copy_nonoverlapping(in_out.as_ptr(), dst, IN_HEADER_SZ);
        std::ptr::copy_nonoverlapping(
            (&raw const (*bufs.header).op_in).cast::<u8>(),
            dst.add(IN_HEADER_SZ),
            op,
        );
        std::ptr::copy_nonoverlapping(bufs.payload, dst.add(IN_HEADER_SZ + op), payload);
    }
    Some(total)
}

/// Answers the entry's request with `errno` (for a request that could not be parsed).
fn answer_error(sender: &UringSender, unique: u64, errno: i32) {
    let mut header = [0u8; OUT_HEADER_SZ];
    header[..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    header[8..].copy_from_slice(&unique.to_ne_bytes());
    if let Err(e) = sender.send(&[IoSlice::new(&header)]) {
        warn!("io_uring: could not answer a malformed request: {e}");
    }
}

/// A `FUSE_IO_URING_CMD_*` submission for queue `qid` with the entry's iovecs at `iov`.
fn command(fd: types::Fd, op: u32, commit_id: u64, qid: u16, iov: u64) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let entry = opcode::UringCmd80::new(fd, op)
        .cmd(cmd)
        .addr(Some(iov))
        .build();
    with_iov_count(entry, 2)
}

/// Sets the SQE's `len` (the iovec count the kernel checks), which `UringCmd80` leaves 0.
fn with_iov_count(entry: squeue::Entry128, count: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe followed by 64 command bytes.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
    raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&count.to_ne_bytes());
    // SAFETY: same layout back.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn push(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    e: squeue::Entry128,
) -> io::Result<()> {
    // SAFETY: the iovecs and buffers the entry points to live as long as the ring (they are
    // dropped after the worker returns, when the ring is dropped too).
    unsafe { ring.submission().push(&e) }.map_err(|_| io::Error::other("io_uring queue full"))
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "io_uring queue {cpu}: not pinned ({})",
                io::Error::last_os_error()
            );
        }
    }
}
