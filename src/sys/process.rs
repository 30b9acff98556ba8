//! Process-level plumbing: going to the background only once the mount is live, signal
//! handling for a clean unmount, and the file-descriptor limit.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::signal::{SigSet, Signal};

/// Which side of [`fork_with_status_pipe`] we are on.
pub enum Forked {
    /// The original process: read the child's verdict from the pipe, then exit.
    Parent(StatusReader),
    /// The daemon-to-be: report the outcome of the mount through the pipe.
    Child(StatusWriter),
}

/// The parent's end of the status pipe.
pub struct StatusReader(File);

/// The child's end of the status pipe.
pub struct StatusWriter(File);

/// What the daemon reported before the parent exits.
pub enum ChildStatus {
    /// The mount is live.
    Mounted,
    /// The mount failed with this one-line message.
    Failed(String),
}

impl StatusReader {
    /// Blocks until the child reports, or until it dies without a word (pipe closed).
    pub fn wait(mut self) -> ChildStatus {
        let mut buf = Vec::new();
        if self.0.read_to_end(&mut buf).is_err() || buf.is_empty() {
            return ChildStatus::Failed("the daemon exited before the mount was ready".into());
        }
        match buf.split_first() {
            Some((b'0', _)) => ChildStatus::Mounted,
            Some((_, msg)) => ChildStatus::Failed(String::from_utf8_lossy(msg).into_owned()),
            None => ChildStatus::Failed("the daemon exited before the mount was ready".into()),
        }
    }
}

impl StatusWriter {
    /// Tells the parent the mount is live; the parent exits 0.
    pub fn mounted(mut self) {
        let _ = self.0.write_all(b"0");
    }

    /// Tells the parent the mount failed; the parent prints `msg` and exits non-zero.
    pub fn failed(mut self, msg: &str) {
        let _ = self.0.write_all(b"1");
        let _ = self.0.write_all(msg.as_bytes());
    }
}

/// Forks once, before any thread exists, keeping a pipe between the two processes so the
/// parent (what containers-storage waits on) exits only when the child has mounted.
pub fn fork_with_status_pipe() -> io::Result<Forked> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // SAFETY: called from `main` before any other thread is started, so the child is a full
    // copy of a single-threaded process and may do anything.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write);
            Ok(Forked::Parent(StatusReader(File::from(read))))
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            Ok(Forked::Child(StatusWriter(File::from(write))))
        }
    }
}

/// Detaches the daemon from the caller's session and points stdin/stdout/stderr at
/// `/dev/null` (kept open: the FUSE device fd must not land on 0-2).
pub fn detach() -> io::Result<()> {
    let _ = nix::unistd::setsid();
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let null = OwnedFd::from(null);
    for target in 0..=2 {
        // SAFETY: 0, 1 and 2 are the standard descriptors of this process; dup2 atomically
        // replaces whatever they were with /dev/null, and the temporary OwnedFd never owns them.
        let mut fd = unsafe { OwnedFd::from_raw_fd(target) };
        let res = rustix::io::dup2(&null, &mut fd);
        std::mem::forget(fd);
        res?;
    }
    if null.as_raw_fd() <= 2 {
        std::mem::forget(null);
    }
    Ok(())
}

/// The signals that ask the daemon to unmount and exit.
pub fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Blocks `set` in the calling thread (and so in every thread started afterwards), so that
/// only a dedicated thread calling [`wait_for_signal`] receives them.
pub fn block_signals(set: &SigSet) -> io::Result<()> {
    set.thread_block().map_err(io::Error::from)
}

/// Waits for one of the (blocked) signals in `set`.
pub fn wait_for_signal(set: &SigSet) -> io::Result<Signal> {
    set.wait().map_err(io::Error::from)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (each lower layer holds a descriptor,
/// and the kernel limits a stack to 500 of them). Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        if limit.current.is_none_or(|cur| cur < max) {
            limit.current = Some(max);
            let _ = setrlimit(Resource::Nofile, limit);
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

/// Largest allocation glibc's malloc serves from its heaps; larger ones are mapped and
/// unmapped on their own.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Tunes glibc's malloc for a long-running daemon whose memory must stay flat: at most one
/// arena per CPU, and a fixed mapping threshold. Call before any thread is started.
///
/// Why: glibc gives each thread that allocates its own arena (up to 8 per CPU) and raises its
/// mapping threshold to the size of any mapped block freed. With 8 reader threads, a
/// directory listing rebuilt on a thread whose arena was idle (the kernel rereads
/// directories whose cached listings it dropped under memory pressure) grew that arena and
/// raised the daemon's peak memory by 4-7 MiB each time, and a 16 MiB request buffer
/// allocated after the threshold had risen came out of a heap, zeroed page by page (16 MiB
/// more resident). Measured (walk of 59k entries, then 6 rereads of every listing): peak
/// 23 → 42 MiB before, 22 → 25 MiB with these settings and compact listings (README).
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets allocator parameters; it is called before other threads
        // exist, and a value it rejects leaves the default in place.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Effective user id of the daemon (0 also inside a user namespace where we are root).
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether process `pid` is in group `gid`: its fsgid or one of its supplementary groups (from
/// `/proc/PID/status`, as the daemon sees ids). Why: FUSE hands us a caller's uid and gid
/// only, and a few POSIX rules (an unprivileged truncate keeps a setgid bit only for a member
/// of the file's group) need the rest.
pub fn in_group(pid: u32, gid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|line| {
        let ids = match line.split_once(':') {
            // Gid: real, effective, saved, filesystem.
            Some(("Gid", rest)) => rest.split_whitespace().nth(3),
            Some(("Groups", rest)) => {
                return rest.split_whitespace().any(|g| g.parse() == Ok(gid));
            }
            _ => None,
        };
        ids.is_some_and(|g| g.parse() == Ok(gid))
    })
}

/// The process (thread group) thread `tid` belongs to, from `/proc/TID/status`; `None` when
/// that cannot be read (the thread is gone). Why: FUSE names the calling thread, and a
/// program may list a directory on one thread and stat its entries on others (libuv's pool,
/// parallel walkers).
pub fn thread_group_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|rest| rest.trim().parse().ok())
}

/// Whether thread `tid` is blocked in a chown(2)-family system call (from
/// `/proc/TID/syscall`); `None` when that cannot be read. Why: FUSE sends the same empty
/// SETATTR for chown(2) to owner and group -1 as for the set-id removal before a write,
/// and only the first may fail for want of ownership.
pub fn in_chown_syscall(tid: u32) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/syscall")).ok()?;
    let nr: libc::c_long = text.split_whitespace().next()?.parse().ok()?;
    #[cfg(target_arch = "x86_64")]
    let legacy = [libc::SYS_chown, libc::SYS_lchown];
    #[cfg(not(target_arch = "x86_64"))]
    let legacy: [libc::c_long; 0] = [];
    Some([libc::SYS_fchown, libc::SYS_fchownat].contains(&nr) || legacy.contains(&nr))
}
