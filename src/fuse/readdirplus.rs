//! READDIRPLUS replies: a listing's entries with their attributes, looked up by two threads.
//!
//! Why two: every entry of a READDIRPLUS reply costs a lookup (a `stat` in each layer that may
//! hold the name, reading inodes from disk when cold) while the walking program sleeps, so one
//! request keeps one CPU busy and leaves the others idle. A helper thread looks up entries
//! ahead while the request's own thread adds them to the reply in order; both claim entries
//! from one counter, so when the reply is full at most the one or two entries in flight have
//! been looked up for nothing (and are released again).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuser::{Generation, ReplyDirectoryPlus};
use rustix::fs::FileType;

use crate::error::{Error, Result};
use crate::fuse::{OverlayFs, file_attr};
use crate::ovl::Entry;
use crate::ovl::inode::Node;
use crate::ovl::readdir::{DirEntry, is_dot_or_dotdot};
use crate::sys;

/// Entries left to list from which a helper thread pays for its start (tens of
/// microseconds, against a few to tens per lookup).
const HELPER_FROM: usize = 16;

/// A lookup's result, or `None` for `.` and `..` (which are not looked up).
type Looked = Option<Result<Entry>>;

impl OverlayFs {
    /// Answers READDIRPLUS of `dir` with `entries` (the rest of its listing from the
    /// requested offset), `offset_after(i)` naming the position after `entries[i]`.
    pub(super) fn reply_readdirplus(
        &self,
        dir: &Arc<Node>,
        entries: &[DirEntry],
        offset_after: impl Fn(usize) -> u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ovl = &*self.ovl;
        let lookup = |e: &DirEntry| -> Looked {
            (!is_dot_or_dotdot(&e.name)).then(|| ovl.lookup(dir, &e.name))
        };
        // Adds entry `i`; true when the reply is full (the entry not added and released).
        let mut add = |i: usize, looked: Looked| -> bool {
            let e = &entries[i];
            let (entry, ttl) = match looked {
                // Not counted as lookups by the kernel, and their attributes are ignored
                // (fuse_direntplus_link): only the number and type matter.
                None => {
                    let mut st = sys::fs::zeroed_stat();
                    st.st_ino = e.ino.0;
                    st.st_mode = FileType::Directory.as_raw_mode();
                    let attr = file_attr(&st, &ovl.cfg.ids);
                    return reply.add(
                        attr.ino,
                        offset_after(i),
                        &e.name,
                        &self.ttl,
                        &attr,
                        Generation(0),
                    );
                }
                Some(Ok(entry)) => (entry, self.ttl),
                // Vanished since the listing was made, or not to be looked up (a refused
                // redirect): still listed, like the kernel's cached listing, as an inode that
                // is not cached, so that the next lookup reports what is wrong.
                Some(Err(err)) => {
                    if !matches!(err, Error::NotFound) {
                        Self::fail("readdirplus lookup", &err);
                    }
                    (ovl.vanished_entry(dir, e), Duration::ZERO)
                }
            };
            let attr = file_attr(&entry.stat, &ovl.cfg.ids);
            let generation = Generation(entry.node.generation);
            let full = reply.add(attr.ino, offset_after(i), &e.name, &ttl, &attr, generation);
            if full {
                // Not sent: the kernel will not count this lookup.
                ovl.forget(entry.node.ino, 1);
            }
            full
        };
        if entries.len() < HELPER_FROM || !self.helper_threads {
            for (i, e) in entries.iter().enumerate() {
                if add(i, lookup(e)) {
                    break;
                }
            }
            return reply.ok();
        }
        // Set once looked up; the reply takes the result out.
        let slots: Vec<OnceLock<Mutex<Looked>>> = entries.iter().map(|_| OnceLock::new()).collect();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        // Looks up the next unclaimed entry; false when none is left.
        let claim = || -> bool {
            let j = next.fetch_add(1, Ordering::Relaxed);
            if j >= entries.len() {
                return false;
            }
            let _ = slots[j].set(Mutex::new(lookup(&entries[j])));
            true
        };
        let mut sent = entries.len();
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if !claim() {
                        break;
                    }
                }
            });
            for (i, slot) in slots.iter().enumerate() {
                while slot.get().is_none() {
                    if !claim() {
                        // The helper is looking this entry up: at most one lookup to wait.
                        std::thread::yield_now();
                    }
                }
                if add(i, slot.get().and_then(take)) {
                    stop.store(true, Ordering::Relaxed);
                    sent = i + 1;
                    break;
                }
            }
        });
        // Entries looked up ahead but not sent: the kernel never counts them.
        for slot in slots.into_iter().skip(sent) {
            if let Some(Ok(entry)) = slot.into_inner().and_then(|m| take(&m)) {
                ovl.forget(entry.node.ino, 1);
            }
        }
        reply.ok();
    }
}

/// Takes a looked-up result out of its slot (`None` once taken, or for `.` and `..`).
fn take(slot: &Mutex<Looked>) -> Looked {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Whether a second thread can run beside a request's own on this machine.
pub(super) fn helper_threads_useful() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}
