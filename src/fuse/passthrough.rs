//! FUSE passthrough (Linux 6.9+): the kernel reads and writes an open file's real file itself,
//! without a round trip to the daemon per request.
//!
//! The kernel's rules shape this module: all passthrough opens of one inode must name the same
//! backing file, and an inode in passthrough mode refuses page-cached opens (the open fails
//! with EIO). So each inode has at most one backing file, registered on its first open and
//! closed after its last release. An inode already open in cached mode stays cached.
//!
//! A lower file open read-only through passthrough keeps its lower backing file until the last
//! such open closes; the kernel cannot switch it to the upper copy the way kernel overlayfs
//! switches its real file after a copy-up. So while it is open, writing to the file is
//! refused with ETXTBSY (opening it for write, truncating it), as the kernel refuses writing
//! to a running executable: nothing can change the copy that the open readers do not see.
//! Read-only opens in the meantime share the lower backing, whose data is the copy's.
//! fuse-overlayfs 2.0 writes into the lower layer in this situation; `passthrough=off` gives
//! kernel overlayfs's behaviour exactly.
//! Registering needs `CAP_SYS_ADMIN` in the initial user namespace; the first refusal turns
//! passthrough off for the rest of the mount (rootless mounts never have it).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuser::BackingId;
use tracing::{debug, info};

/// The backing file of one inode, shared by its passthrough opens.
struct Backing {
    id: Arc<BackingId>,
    /// The backing file is in a lower layer: the file must not change while it is open. An
    /// inode's real file changes only by a copy-up (lower to upper), so this also tells
    /// whether a new open is on the same real file.
    lower: bool,
    opens: usize,
}

/// How one open file handle does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Passthrough,
    /// Through the daemon, with the kernel's page cache.
    Cached,
}

/// Per-inode state: lock order is this table's lock alone (it calls nothing that locks).
#[derive(Default)]
struct InodeIo {
    backing: Option<Backing>,
    cached_opens: usize,
}

/// The real file behind a new handle.
pub struct RealOpen<'a> {
    /// The open real file.
    pub fd: BorrowedFd<'a>,
    /// It is in a lower layer (a read-only open of a lower file or of a metacopy's data).
    pub lower: bool,
    /// The open may write.
    pub write: bool,
}

/// What an open should reply.
pub enum OpenMode {
    /// Reply `opened_passthrough` with this backing id.
    Passthrough(Arc<BackingId>),
    /// Reply `opened` with the page cache.
    Cached,
    /// Refuse with ETXTBSY: a write to a lower file that is open through passthrough.
    Busy,
}

/// How long a write waits for the pinning readers to go before it is refused. The kernel
/// sends RELEASE in the background after `close()` returns, and another thread may still be
/// handling it, so a program that closes a reader and then opens the file for writing
/// would otherwise see ETXTBSY now and then.
const RELEASE_GRACE: Duration = Duration::from_millis(200);

/// The passthrough bookkeeping of a mount.
pub struct Passthrough {
    enabled: AtomicBool,
    state: Mutex<State>,
    /// Notified on every release (see [`RELEASE_GRACE`]).
    released: Condvar,
}

#[derive(Default)]
struct State {
    inodes: HashMap<u64, InodeIo>,
    handles: HashMap<u64, (u64, Mode)>,
}

impl Passthrough {
    /// Bookkeeping for a mount; `enabled` is what the options and the kernel allow.
    pub fn new(enabled: bool) -> Passthrough {
        Passthrough {
            enabled: AtomicBool::new(enabled),
            state: Mutex::new(State::default()),
            released: Condvar::new(),
        }
    }

    /// Turns passthrough off (the kernel did not grant it at init).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }

    /// Whether passthrough is in use.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Decides how handle `fh` of inode `ino`, open on the real file `fd` (in a lower layer if
    /// `lower`; for writing if `write`), does its I/O; `register` turns the real file into a
    /// backing id (the reply's `open_backing`). On `Busy` the handle is not recorded.
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        open: RealOpen<'_>,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> OpenMode {
        let refused = |b: &Backing| b.lower != open.lower && (open.write || !b.lower);
        let mut st = self.wait_for_release(ino, refused);
        let (mode, out) = self.decide(&mut st, ino, open, register);
        if let Some(mode) = mode {
            st.handles.insert(fh, (ino, mode));
        }
        out
    }

    /// Whether the data of inode `ino` must not change now (see the module comment).
    pub fn data_pinned(&self, ino: u64) -> bool {
        let st = self.wait_for_release(ino, |b| b.lower);
        backing_of(&st, ino).is_some_and(|b| b.lower)
    }

    /// The state, once the backing of `ino` no longer satisfies `blocks`, or after
    /// [`RELEASE_GRACE`] (the caller then refuses).
    fn wait_for_release(
        &self,
        ino: u64,
        blocks: impl Fn(&Backing) -> bool,
    ) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + RELEASE_GRACE;
        while backing_of(&st, ino).is_some_and(&blocks) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match self.released.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(e) => e.into_inner().0,
            };
        }
        st
    }

    fn decide(
        &self,
        st: &mut State,
        ino: u64,
        open: RealOpen<'_>,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> (Option<Mode>, OpenMode) {
        let io = st.inodes.entry(ino).or_default();
        let cached = |io: &mut InodeIo| {
            io.cached_opens += 1;
            (Some(Mode::Cached), OpenMode::Cached)
        };
        if !self.enabled() {
            return cached(io);
        }
        if let Some(b) = io.backing.as_mut() {
            if b.lower != open.lower && (open.write || !b.lower) {
                // Copied up since the backing was registered, and this open could change the
                // copy (or, impossibly, back from upper to lower).
                return (None, OpenMode::Busy);
            }
            // A read-only open of the copy of a pinned lower file reads the same data there.
            b.opens += 1;
            return (Some(Mode::Passthrough), OpenMode::Passthrough(b.id.clone()));
        }
        if io.cached_opens > 0 {
            return cached(io);
        }
        match register(open.fd.as_fd()) {
            Ok(id) => {
                let id = Arc::new(id);
                io.backing = Some(Backing {
                    id: id.clone(),
                    lower: open.lower,
                    opens: 1,
                });
                (Some(Mode::Passthrough), OpenMode::Passthrough(id))
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EPERM) {
                    info!("FUSE passthrough refused ({e}): reads and writes go through the daemon");
                    self.disable();
                } else {
                    debug!(error = %e, "no backing id, page cache instead");
                }
                cached(io)
            }
        }
    }

    /// Forgets handle `fh`; the last passthrough handle of an inode closes its backing id.
    pub fn release(&self, fh: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ino, mode)) = st.handles.remove(&fh) else {
            return;
        };
        let Some(io) = st.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            Mode::Passthrough => {
                if let Some(b) = io.backing.as_mut() {
                    b.opens -= 1;
                    if b.opens == 0 {
                        io.backing = None;
                    }
                }
            }
            Mode::Cached => io.cached_opens = io.cached_opens.saturating_sub(1),
        }
        if io.backing.is_none() && io.cached_opens == 0 {
            st.inodes.remove(&ino);
        }
        self.released.notify_all();
    }
}

fn backing_of(st: &State, ino: u64) -> Option<&Backing> {
    st.inodes.get(&ino).and_then(|io| io.backing.as_ref())
}
