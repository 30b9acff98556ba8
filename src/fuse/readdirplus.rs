//! READDIRPLUS replies: a listing's entries with their attributes.
//!
//! Each entry sent counts as one kernel lookup of its inode, so the reply is built entry by
//! entry and stops at the first that does not fit (released again). `.` and `..` cost
//! nothing: the kernel ignores their attributes.
//!
//! Tried and dropped: looking entries up ahead on a second thread. In one interleaved run of
//! 7 repetitions it made a cold `find` 6% faster but a cold stat walk and `ls -lR` 4% slower,
//! and the daemon's RSS after a walk 5 MiB larger (a malloc arena per helper thread).

use std::sync::Arc;
use std::time::Duration;

use fuser::{Generation, ReplyDirectoryPlus};
use rustix::fs::FileType;

use crate::error::Error;
use crate::fuse::{OverlayFs, file_attr};
use crate::ovl::inode::Node;
use crate::ovl::readdir::{ListingRead, is_dot_or_dotdot};
use crate::sys;

impl OverlayFs {
    /// Answers READDIRPLUS of `dir` with the rest of `listing` from the requested offset.
    pub(super) fn reply_readdirplus(
        &self,
        dir: &Arc<Node>,
        listing: &ListingRead,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ovl = &*self.ovl;
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
