//! READDIRPLUS replies: a listing's entries, with their attributes for callers that use them.
//!
//! Each entry sent with attributes counts as one kernel lookup of its inode, so the reply is
//! built entry by entry and stops at the first that does not fit (released again). `.` and
//! `..` cost nothing: the kernel ignores their attributes.
//!
//! Attributes cost a `stat` of the entry in its layer, a disk read on a cold cache, and a
//! caller that only lists names (`find -name`, `ls -f`, a shell glob) never uses them. The
//! kernel's own rule (`FUSE_READDIRPLUS_AUTO`: attributes in the first batch of a listing,
//! then only after a lookup in that directory) guesses wrong both ways on big directories:
//! a walker that reads a whole directory before it stats anything (`find -printf`, `ls -l`,
//! `du`: fts) gets the later batches bare and then sends one LOOKUP round trip per entry,
//! while a listing-only walker pays a `stat` per entry of every first batch. So the kernel
//! asks for READDIRPLUS every time and the choice is made here, per caller
//! ([`ListingCallers`]): a process gets attributes once it has looked up a name in a
//! directory we just listed to it without them, bare entries (node id 0: listed, not looked
//! up, see `vendor/fuser/PATCHED.md`) until then. Subdirectories always carry attributes: a
//! walker descends into them, which would otherwise cost a LOOKUP each.
//!
//! Tried and dropped: looking entries up ahead on a second thread. In one interleaved run of
//! 7 repetitions it made a cold `find` 6% faster but a cold stat walk and `ls -lR` 4% slower,
//! and the daemon's RSS after a walk 5 MiB larger (a malloc arena per helper thread).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{Generation, INodeNo, ReplyDirectoryPlus};
use lru::LruCache;
use rustix::fs::FileType;

use crate::error::Error;
use crate::fuse::{OverlayFs, file_attr, fuse_file_type};
use crate::ovl::inode::Node;
use crate::ovl::readdir::{ListingRead, is_dot_or_dotdot};
use crate::sys;

impl OverlayFs {
    /// Answers READDIRPLUS of `dir` from process `pid` with the rest of `listing` from the
    /// requested offset.
    pub(super) fn reply_readdirplus(
        &self,
        pid: u32,
        dir: &Arc<Node>,
        listing: &ListingRead,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ovl = &*self.ovl;
        let with_attributes = self.listing_callers.wants_attributes(pid, dir.ino.0);
        for (i, e) in listing.entries.iter_from(listing.start) {
            if is_dot_or_dotdot(e.name) {
                // Not counted as lookups by the kernel, and their attributes are ignored
                // (fuse_direntplus_link): only the number and type matter.
                let mut st = sys::fs::zeroed_stat();
                st.st_ino = e.ino.0;
                st.st_mode = FileType::Directory.as_raw_mode();
                let attr = file_attr(&st, &ovl.cfg.ids);
                let next = listing.offset_after(i);
                if reply.add(attr.ino, next, e.name, &self.ttl, &attr, Generation(0)) {
                    break;
                }
                continue;
            }
            if !with_attributes && e.file_type != FileType::Directory {
                let kind = fuse_file_type(e.file_type);
                if reply.add_unlooked(INodeNo(e.ino.0), listing.offset_after(i), kind, e.name) {
                    break;
                }
                continue;
            }
            let (entry, ttl) = match ovl.lookup(dir, e.name) {
                Ok(entry) => (entry, self.ttl),
                // Vanished since the listing was made, or not to be looked up (a refused
                // redirect): still listed, like the kernel's cached listing, as an inode that
                // is not cached, so that the next lookup reports what is wrong.
                Err(err) => {
                    if !matches!(err, Error::NotFound) {
                        Self::fail("readdirplus lookup", &err);
                    }
                    (ovl.vanished_entry(dir, e), Duration::ZERO)
                }
            };
            let attr = file_attr(&entry.stat, &ovl.cfg.ids);
            let generation = Generation(entry.node.generation);
            if reply.add(
                attr.ino,
                listing.offset_after(i),
                e.name,
                &ttl,
                &attr,
                generation,
            ) {
                // Not sent: the kernel will not count this lookup.
                ovl.forget(entry.node.ino, 1);
                break;
            }
        }
        reply.ok();
    }
}

/// How many processes, threads and directories [`ListingCallers`] remembers each (the
/// least recent is forgotten first).
const CALLERS_KEPT: NonZeroUsize = NonZeroUsize::new(256).expect("nonzero");

/// Which processes use the attributes of what they list: those that looked up a name in a
/// directory just after we listed it to them without attributes. Keyed by process, not by
/// the thread FUSE names: a program may list on one thread and stat on others.
pub(super) struct ListingCallers {
    state: Mutex<Callers>,
    /// Thread id → process id (`/proc/TID/status`; the thread id itself when unreadable).
    process_of: fn(u32) -> u32,
}

struct Callers {
    /// Thread id → process id, read once per thread. A thread id reused by another process
    /// while remembered only misleads a hint.
    processes: LruCache<u32, u32>,
    /// Directory → the process we last listed it to without attributes.
    listed_bare: LruCache<u64, u32>,
    /// Processes that looked up a name we had listed to them without attributes.
    stat_callers: LruCache<u32, ()>,
}

impl ListingCallers {
    pub(super) fn new() -> ListingCallers {
        Self::with_process_of(|tid| sys::process::thread_group_of(tid).unwrap_or(tid))
    }

    fn with_process_of(process_of: fn(u32) -> u32) -> ListingCallers {
        ListingCallers {
            state: Mutex::new(Callers {
                processes: LruCache::new(CALLERS_KEPT),
                listed_bare: LruCache::new(CALLERS_KEPT),
                stat_callers: LruCache::new(CALLERS_KEPT),
            }),
            process_of,
        }
    }

    /// Whether READDIRPLUS of `dir` for thread `tid` should carry attributes; if not,
    /// remembers to which process `dir` was listed bare.
    pub(super) fn wants_attributes(&self, tid: u32, dir: u64) -> bool {
        let process = self.process(tid);
        let mut state = self.lock();
        if state.stat_callers.get(&process).is_some() {
            return true;
        }
        state.listed_bare.put(dir, process);
        false
    }

    /// Notes a LOOKUP of a name in `parent` by thread `tid`: if we just listed `parent` bare
    /// to its process, that process wants attributes from now on. One map lookup unless
    /// `parent` was listed bare.
    pub(super) fn looked_up(&self, tid: u32, parent: u64) {
        let Some(listed_to) = self.lock().listed_bare.peek(&parent).copied() else {
            return;
        };
        if self.process(tid) == listed_to {
            let mut state = self.lock();
            state.stat_callers.put(listed_to, ());
            state.listed_bare.pop(&parent);
        }
    }

    /// The process of thread `tid`, read outside the lock on the first request of a thread.
    fn process(&self, tid: u32) -> u32 {
        if let Some(&process) = self.lock().processes.get(&tid) {
            return process;
        }
        let process = (self.process_of)(tid);
        self.lock().processes.put(tid, process);
        process
    }

    /// A poisoned lock only means a panic elsewhere mid-update of a hint: keep using it.
    fn lock(&self) -> std::sync::MutexGuard<'_, Callers> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads 100-199 belong to process 1, the others are processes of their own.
    fn callers() -> ListingCallers {
        ListingCallers::with_process_of(|tid| if (100..200).contains(&tid) { 1 } else { tid })
    }

    #[test]
    fn a_caller_gets_attributes_after_a_lookup_in_a_directory_listed_bare() {
        let callers = callers();
        assert!(!callers.wants_attributes(10, 1));
        // A lookup elsewhere (or by another process) says nothing about this listing.
        callers.looked_up(10, 2);
        callers.looked_up(11, 1);
        assert!(!callers.wants_attributes(10, 1));
        assert!(!callers.wants_attributes(11, 3));
        callers.looked_up(10, 1);
        assert!(callers.wants_attributes(10, 4));
        assert!(callers.wants_attributes(10, 5));
        assert!(!callers.wants_attributes(11, 3));
    }

    #[test]
    fn a_process_that_lists_on_one_thread_and_stats_on_another_gets_attributes() {
        let callers = callers();
        assert!(!callers.wants_attributes(100, 7));
        callers.looked_up(150, 7);
        assert!(callers.wants_attributes(199, 8));
        assert!(callers.wants_attributes(100, 9));
        assert!(!callers.wants_attributes(200, 9));
    }

    #[test]
    fn what_is_remembered_is_bounded_and_the_least_recent_is_forgotten() {
        let callers = ListingCallers::with_process_of(|tid| tid);
        assert!(!callers.wants_attributes(1, 1));
        callers.looked_up(1, 1);
        for tid in 2..=CALLERS_KEPT.get() as u32 + 1 {
            assert!(!callers.wants_attributes(tid, u64::from(tid)));
            callers.looked_up(tid, u64::from(tid));
        }
        let state = callers.lock();
        assert_eq!(state.processes.len(), CALLERS_KEPT.get());
        assert_eq!(state.stat_callers.len(), CALLERS_KEPT.get());
        assert!(!state.stat_callers.contains(&1));
    }
}
