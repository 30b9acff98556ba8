//! Busy polling of `/dev/fuse` while requests keep coming (`busy_poll=MICROS`).
//!
//! A FUSE round trip wakes two sleeping threads: the daemon's reader when the request is
//! queued, and the caller when the reply is written. Each wake-up costs several microseconds
//! of scheduling (more on a virtual machine, where waking an idle CPU may exit to the host),
//! and a metadata walk is a chain of such round trips (`ls -lR` asks for one xattr per
//! entry, and the kernel caches none). So while requests keep arriving, one reader (the
//! thread on the session's own fd) reads without sleeping: its file description is
//! switched to `O_NONBLOCK` and fuser's loop retries `EAGAIN` at once. The other readers
//! (on cloned fds) keep sleeping and take over whenever the polling one is busy with a
//! slow request.
//!
//! The switch is on only while busy: every metadata request counts itself
//! ([`BusyPoll::request`]); the first one after a quiet spell turns polling on, and a
//! watcher thread turns it off again once a whole window has passed without one. An idle
//! mount therefore costs nothing, and a busy one at most one CPU, which is the CPU its
//! clients wait for.
//!
//! Every queued request also wakes one of the sleeping readers, which finds the queue
//! empty; the scheduler put that futile wake-up where the reader last ran, often the
//! poller's CPU, where it preempted the poller mid round trip (seen with `perf sched`: one
//! preemption of the poller per request). So while polling is on, the poller is pinned to
//! a CPU other than its latest caller's and the other readers to the rest (see
//! [`crate::fuse::reader_cpus`]).
//!
//! Tried and dropped: pinning every reader to the CPU of the caller, when there is one,
//! instead of polling. A reader then runs while its caller sleeps and wakes it without an
//! inter-processor interrupt: 13 µs per `getxattr` round trip with `ls` pinned to that CPU
//! too, against 15 µs polling and 25 µs with neither. But an unpinned caller does not stay:
//! woken by a reader that still runs on its CPU, it is moved to the idle one, and a warm
//! `ls -lR` bounced between the CPUs every window and took twice as long.
//!
//! Cold walks, which wait for the disk, gain nothing from it and were up to 5-10% slower
//! in the benchmarks (within the noise of the machine in most runs). Turning polling off
//! for a while after a slow request did not help them and cost warm walks 6-12% (on a busy
//! machine any request can be slow), so there is no such rule.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tracing::{debug, warn};

use crate::fuse::reader_cpus::ReaderCpus;

/// Which threads read the session: fuser names them `fuser-0` to `fuser-{count - 1}`, and
/// the last one reads the session's own fd (the polled one).
pub struct Readers {
    /// Thread name of the reader of the session's own fd.
    pub poller_name: String,
    /// How many reader threads the session runs.
    pub count: usize,
}

/// The polling switch of one session's own `/dev/fuse` file description.
pub struct BusyPoll {
    /// A duplicate of the session's fd: same file description, so its `O_NONBLOCK` flag is
    /// the one the session's reader sees.
    fd: OwnedFd,
    /// How long without a request turns polling off.
    window: Duration,
    /// Requests seen so far (only compared, never shown).
    requests: AtomicU64,
    /// The process (thread) of the latest request, 0 if not known: the poller keeps off
    /// its CPU.
    caller: AtomicU32,
    /// Whether polling is on; read without the lock on every request.
    hot: AtomicBool,
    /// Serializes the switching (the flag and `O_NONBLOCK` change together).
    state: Mutex<State>,
    /// Wakes the watcher when polling turns on or the session ends.
    wake: Condvar,
    /// The session's readers, to keep apart while polling (None: leave them where they are).
    readers: Option<Readers>,
}

#[derive(Default)]
struct State {
    stopped: bool,
}

impl BusyPoll {
    /// Starts the watcher for the session whose fd is `session_fd`; `window` is the quiet
    /// time after which the reader sleeps again; `readers` names the threads to keep apart.
    pub fn start(
        session_fd: BorrowedFd<'_>,
        window: Duration,
        readers: Option<Readers>,
    ) -> std::io::Result<Arc<BusyPoll>> {
        let poll = Arc::new(BusyPoll {
            fd: session_fd.try_clone_to_owned()?,
            window,
            requests: AtomicU64::new(0),
            caller: AtomicU32::new(0),
            hot: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            readers,
        });
        let watcher = poll.clone();
        std::thread::Builder::new()
            .name("busy-poll".into())
            .spawn(move || watcher.watch())?;
        Ok(poll)
    }

    /// Counts one request from process (thread) `caller` (0: not known, as for the
    /// kernel's own requests); turns polling on if it was off. Called at the start of every
    /// metadata request, so it is one relaxed increment and two loads when polling is on
    /// and the caller the same.
    pub fn request(&self, caller: u32) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if caller != 0 && self.caller.load(Ordering::Relaxed) != caller {
            self.caller.store(caller, Ordering::Relaxed);
        }
        if !self.hot.load(Ordering::Relaxed) {
            self.turn_on();
        }
    }

    /// Stops the watcher (the session has ended).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn turn_on(&self) {
        let mut state = self.lock();
        if state.stopped || self.hot.load(Ordering::Relaxed) {
            return;
        }
        if self.set_nonblocking(true) {
            self.hot.store(true, Ordering::Relaxed);
        } else {
            // Not worth a failing fcntl per request: serve without polling from now on.
            state.stopped = true;
        }
        self.wake.notify_all();
    }

    /// The watcher: sleeps while polling is off; while it is on, checks once per window
    /// whether any request came (and keeps the readers apart), and turns polling off when
    /// none did.
    fn watch(&self) {
        let mut cpus: Option<ReaderCpus> = None;
        let mut state = self.lock();
        loop {
            while !state.stopped && !self.hot.load(Ordering::Relaxed) {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.stopped {
                break;
            }
            drop(state);
            if cpus.is_none() {
                cpus = self
                    .readers
                    .as_ref()
                    .and_then(|r| ReaderCpus::find(&r.poller_name, r.count));
            }
            state = self.watch_until_quiet(cpus.as_mut());
            if let Some(cpus) = &mut cpus {
                cpus.rejoin();
            }
        }
        // Leave the reader blocking: it must not spin while the session winds down.
        self.set_nonblocking(false);
    }

    /// Sleeps window after window until one passes without a request, then turns polling
    /// off (or until the session stops); returns holding the lock. Before each window, moves
    /// the poller off the latest caller's CPU if it is there.
    fn watch_until_quiet(&self, mut cpus: Option<&mut ReaderCpus>) -> MutexGuard<'_, State> {
        loop {
            if let Some(cpus) = cpus.as_deref_mut() {
                cpus.keep_apart(self.caller.load(Ordering::Relaxed));
            }
            let seen = self.requests.load(Ordering::Relaxed);
            std::thread::sleep(self.window);
            let state = self.lock();
            if state.stopped || !self.hot.load(Ordering::Relaxed) {
                return state;
            }
            if self.requests.load(Ordering::Relaxed) == seen && self.set_nonblocking(false) {
                self.hot.store(false, Ordering::Relaxed);
                return state;
            }
        }
    }

    /// Sets or clears `O_NONBLOCK`; false (and a log line) if the kernel refused.
    fn set_nonblocking(&self, on: bool) -> bool {
        let res = fcntl(&self.fd, FcntlArg::F_GETFL).and_then(|bits| {
            let mut flags = OFlag::from_bits_truncate(bits);
            flags.set(OFlag::O_NONBLOCK, on);
            fcntl(&self.fd, FcntlArg::F_SETFL(flags))
        });
        match res {
            Ok(_) => {
                debug!(on, "busy polling");
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot switch busy polling of /dev/fuse");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Instant;

    /// A pipe stands in for `/dev/fuse`: `O_NONBLOCK` works the same on both.
    fn nonblocking(fd: &OwnedFd) -> bool {
        let bits = fcntl(fd, FcntlArg::F_GETFL).unwrap();
        OFlag::from_bits_truncate(bits).contains(OFlag::O_NONBLOCK)
    }

    #[test]
    fn a_request_turns_polling_on_and_a_quiet_window_off() {
        let (rx, _tx) = nix::unistd::pipe().unwrap();
        let poll = BusyPoll::start(rx.as_fd(), Duration::from_millis(2), None).unwrap();
        assert!(!nonblocking(&rx));
        poll.request(0);
        assert!(poll.hot.load(Ordering::Relaxed));
        assert!(nonblocking(&rx), "the shared file description polls");
        let deadline = Instant::now() + Duration::from_secs(5);
        while nonblocking(&rx) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !nonblocking(&rx),
            "still polling long after the last request"
        );
        assert!(!poll.hot.load(Ordering::Relaxed));
        poll.stop();
    }
}
