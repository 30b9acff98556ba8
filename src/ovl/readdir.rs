//! Merged directory listings (kernel `fs/overlayfs/readdir.c`).
//!
//! A listing is built when a directory is read from offset 0 (open or `rewinddir`) and kept
//! while it may be read (see [`Listings`]): offsets name it and index into it.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use rustix::fs::FileType;

use crate::error::{Error, Result};
use crate::ovl::inode::{Ino, Node, NodeState};
use crate::ovl::{Entry, Overlay, vfs, whiteout};
use crate::sys;

pub use crate::ovl::listing::{DirEntry, Listing};

/// Listings being read, by directory inode and generation.
///
/// Why not per open stream: the kernel opens our directories without asking (OPENDIR answers
/// ENOSYS, which saves an OPENDIR and a RELEASEDIR round trip per directory and lets the kernel
/// cache listings), so a read names its listing by the offset we gave out: the generation in
/// the high 32 bits, the index in the low ones. A read at offset 0 (open, `rewinddir`) builds a
/// new generation, so `telldir`/`seekdir` stay stable and unlinks during a walk do not shift
/// entries, as with the kernel's per-open `ovl_dir_cache`. A listing read to its end is
/// kept after it was read to its end: the kernel's listing cache is shared by every open of
/// the directory, so another reader may still continue from an offset of it after the cache
/// is dropped (reading uncached at that offset). Listings fall out of a small LRU, bounded
/// also by their total number of entries; a new listing equal to one kept for the directory
/// shares its memory. A read of a dropped generation rebuilds it.
#[derive(Debug)]
pub struct Listings {
    map: Mutex<ListingCache>,
    next_gen: AtomicU32,
}

/// Listings by (directory, generation).
type ListingCache = LruCache<(Ino, u32), Arc<Listing>>;

/// Listings kept for streams still reading.
const LISTINGS_KEPT: NonZeroUsize = NonZeroUsize::new(64).expect("nonzero");

/// Entries kept at most over all listings (shared ones counted each time).
const ENTRIES_KEPT: usize = 4 << 20;

impl Default for Listings {
    fn default() -> Self {
        Listings {
            map: Mutex::new(LruCache::new(LISTINGS_KEPT)),
            next_gen: AtomicU32::new(1),
        }
    }
}

/// The part of a listing one READDIR(PLUS) serves.
#[derive(Debug)]
pub struct ListingRead {
    /// The whole listing.
    pub entries: Arc<Listing>,
    /// Index of the first entry to return.
    pub start: usize,
    generation: u32,
}

impl ListingRead {
    /// The offset the kernel passes back to continue after entry `i`.
    pub fn offset_after(&self, i: usize) -> u64 {
        (u64::from(self.generation) << 32) | (i as u64 + 1)
    }
}

impl Listings {
    fn lock(&self) -> MutexGuard<'_, ListingCache> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Overlay {
    /// fsync of a directory: its upper copy, if it has one (nothing else can be dirty).
    pub fn fsyncdir(&self, dir: &Node, datasync: bool) -> Result<()> {
        if !self.cfg.fsync || !dir.is_upper() {
            return Ok(());
        }
        let fd = self.real_dir_fd(dir, crate::ovl::layer::LayerIdx::UPPER)?;
        let d = sys::fs::reopen(
            fd.as_fd(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        )
        .map_err(|e| Error::io("fsyncdir", e))?;
        let res = if datasync {
            rustix::fs::fdatasync(&d)
        } else {
            rustix::fs::fsync(&d)
        };
        res.map_err(|e| Error::io("fsyncdir", e.into()))
    }

    /// The listing of directory `dir` to serve a read at `offset` (see [`Listings`]); a new
    /// one at offset 0.
    pub fn readdir(&self, dir: &Node, offset: u64) -> Result<ListingRead> {
        if !dir.is_dir() {
            return Err(Error::NotDir);
        }
        let (generation, start) = match offset {
            0 => (
                self.dirs.next_gen.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff,
                0,
            ),
            o => ((o >> 32) as u32 & 0x7fff_ffff, (o & 0xffff_ffff) as usize),
        };
        let key = (dir.ino, generation);
        let cached = match offset {
            0 => None,
            _ => self.dirs.lock().get(&key).cloned(),
        };
        let entries = match cached {
            Some(l) => l,
            None => {
                let fresh = self.read_merged(dir)?;
                let map = self.dirs.lock();
                let same = map
                    .iter()
                    .find(|((ino, _), l)| *ino == dir.ino && l.as_ref() == &fresh)
                    .map(|(_, l)| l.clone());
                same.unwrap_or_else(|| Arc::new(fresh))
            }
        };
        let mut map = self.dirs.lock();
        map.put(key, entries.clone());
        let mut total: usize = map.iter().map(|(_, l)| l.len()).sum();
        while total > ENTRIES_KEPT && map.len() > 1 {
            match map.pop_lru() {
                Some((_, l)) => total -= l.len(),
                None => break,
            }
        }
        Ok(ListingRead {
            entries,
            start,
            generation,
        })
    }

    /// What a directory stream shows for entry `e` of `dir` whose name is gone since the
    /// listing was made: kernel overlayfs keeps returning such names from its per-stream
    /// cache, so readdirplus returns them too, as an inode that cannot be used (zero cache
    /// time; every request on it fails with ENOENT). Counts one kernel lookup.
    pub fn vanished_entry(&self, dir: &Arc<Node>, e: DirEntry<'_>) -> Entry {
        let ghost = Node::new(
            e.ino,
            e.file_type,
            NodeState::new(Some(dir.clone()), e.name.to_owned(), Vec::new()),
        );
        let node = self.inodes.get_or_insert_ghost(ghost);
        // Only the number, the type and one link mean anything.
        let mut stat = sys::fs::zeroed_stat();
        stat.st_ino = e.ino.0;
        stat.st_mode = e.file_type.as_raw_mode();
        stat.st_nlink = 1;
        Entry { node, stat }
    }

    /// Builds the merged listing of `dir`: `.` and `..` first, then each name once (the top
    /// layer's entry), whiteouts and their targets left out.
    pub fn read_merged(&self, dir: &Node) -> Result<Listing> {
        let reals = dir.state().reals.clone();
        let parent_ino = dir.state().parent.as_ref().map_or(Ino::ROOT, |p| p.ino);
        let mut out = Listing::default();
        out.push(OsStr::new("."), dir.ino, FileType::Directory);
        out.push(OsStr::new(".."), parent_ino, FileType::Directory);
        // Names of the layers above the one being read (a name is listed once, from the
        // topmost layer holding it); the lowest layer's are never needed, and a directory in
        // one layer needs none.
        let mut seen: HashSet<OsString> = HashSet::new();
        let mut whited: HashSet<OsString> = HashSet::new();
        // Whether an entry shows a number other than its real object's (an origin's).
        let mut shows_other_ino = false;
        let layers = reals.len();
        for (i, real) in reals.into_iter().enumerate() {
            let more_below = i + 1 < layers;
            let fd = self.real_dir_fd(dir, real.layer)?;
            let mut names = self
                .lower_names
                .as_ref()
                .filter(|_| !real.layer.is_upper())
                .map(|n| n.names());
            // Whiteouts of this layer hide names in the layers below only (OCI layer.md).
            let mut layer_whiteouts = Vec::new();
            // Entries are handled as getdents returns them: a large directory is not held
            // twice (read, then merged) while its listing is built.
            sys::fs::read_dir_each(
                fd.as_fd(),
                |e| Error::io("readdir", e),
                |e| {
                    if let Some(names) = names.as_mut() {
                        names.add(&e.name);
                    }
                    if whiteout::is_reserved_name(&e.name) {
                        if let Some(target) = whiteout::hidden_by_wh(&e.name) {
                            layer_whiteouts.push(target.to_owned());
                        }
                        return Ok(());
                    }
                    if seen.contains(&e.name) || whited.contains(&e.name) {
                        return Ok(());
                    }
                    let mut file_type = e.file_type;
                    if file_type == FileType::Unknown
                        || file_type == FileType::CharacterDevice
                        || (real.xwhiteouts && file_type == FileType::RegularFile)
                    {
                        let st = match sys::fs::stat_name(fd.as_fd(), &e.name) {
                            Ok(st) => st,
                            // Gone since getdents: not part of the listing.
                            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                                return Ok(());
                            }
                            Err(err) => return Err(Error::io("stat dir entry", err)),
                        };
                        file_type = FileType::from_raw_mode(st.st_mode);
                        if whiteout::is_chardev_whiteout(&st)
                            || (real.xwhiteouts
                                && whiteout::may_be_xattr_whiteout(&st)
                                && whiteout::is_xattr_whiteout(fd.as_fd(), &e.name)
                                    .map_err(|err| Error::io("read xattr whiteout", err))?)
                        {
                            layer_whiteouts.push(e.name);
                            return Ok(());
                        }
                    }
                    if real.layer.is_upper() && real.impure && !self.origin_known(e.ino) {
                        // A copy-up from an earlier mount shows its origin's number: find it.
                        let _ = self.lookup_real(dir, &e.name);
                    }
                    if more_below {
                        seen.insert(e.name.clone());
                    }
                    let ino = self.ino_for(real.layer, e.ino);
                    shows_other_ino |= ino != self.own_ino(real.layer, e.ino);
                    if out.push(&e.name, ino, file_type) {
                        Ok(())
                    } else {
                        Err(Error::io(
                            "readdir",
                            std::io::Error::from_raw_os_error(libc::EOVERFLOW),
                        ))
                    }
                },
            )?;
            if let (Some(known), Some(names)) = (self.lower_names.as_ref(), names) {
                known.remember(dir.ino, real.layer, &fd, names);
            }
            whited.extend(layer_whiteouts);
        }
        if !shows_other_ino {
            self.drop_useless_impure(dir)?;
        }
        out.shrink_to_fit();
        Ok(out)
    }

    /// A non-merged upper directory whose entries all show their real inode numbers needs no
    /// impure mark; kernel overlayfs removes it when it lists such a directory
    /// (`ovl_cache_get_impure` finding no entry whose number differs from the real one), and so
    /// do we where origins are not file handles (rootless), so that no entry can show an
    /// origin's number later either. With file handles the mark stays: an entry's origin may
    /// be one stratafs does not resolve (it only recognises an origin under the same name).
    fn drop_useless_impure(&self, dir: &Node) -> Result<()> {
        let Ok(upper) = self.upper_ctx() else {
            return Ok(());
        };
        let impure_upper_only = {
            let st = dir.state();
            st.reals.len() == 1 && st.reals[0].layer.is_upper() && st.reals[0].impure
        };
        if !impure_upper_only || upper.origin_handles() {
            return Ok(());
        }
        let fd = self.real_dir_fd(dir, crate::ovl::layer::LayerIdx::UPPER)?;
        match vfs::do_removexattr(fd.as_fd(), &upper.xattr("impure")) {
            Err(e) if e.errno() != libc::ENODATA => return Err(e),
            _ => {}
        }
        if let Some(r) = dir.state_mut().reals.first_mut() {
            r.impure = false;
        }
        Ok(())
    }
}

/// Whether `name` is `.` or `..` (entries the kernel does not count as lookups).
pub fn is_dot_or_dotdot(name: &OsStr) -> bool {
    name == "." || name == ".."
}
