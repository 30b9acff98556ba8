//! The names of lower directories, remembered from the listings we build, so a lookup can skip
//! a lower layer that does not hold the name without asking its filesystem.
//!
//! A lookup searches the layers from the top until one holds the name; every layer without it
//! costs two failing `fstatat`s (the name and its `.wh.` whiteout file). Through a 100-layer
//! stack that is ~100 failing lookups per entry, and it dominated a walk's time. Building a
//! merged listing already reads every layer's names (`getdents`), so they are kept here for
//! the lookups that follow a listing (`find`, `ls -l`, readdirplus).
//!
//! Only lower layers: they do not change while mounted (the overlayfs rule; changes made
//! under a mount have undefined effect), while the upper layer changes under us. A set is
//! bound to the very directory handle it was read through (the `Arc` in the directory-handle
//! cache): when that handle leaves the cache, or the node's number is reused, the set is no
//! longer consulted. Capacity is bounded in directories and in names. Names are kept as
//! 64-bit hashes (see [`NameSet`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, Weak};

use lru::LruCache;

use crate::ovl::inode::Ino;
use crate::ovl::layer::LayerIdx;
use crate::ovl::whiteout;

/// Directories whose names are kept.
const MAX_DIRS: usize = 512;
/// Names kept over all directories (about 10 bytes each: a hash, not the name).
const MAX_NAMES: usize = 128 * 1024;
/// Names of one directory worth keeping at most: a huge directory is not worth its memory.
const MAX_NAMES_PER_DIR: usize = MAX_NAMES / 4;

/// A set of name hashes, hashed once already: the set's own hashing passes them through.
type HashSet64 = HashSet<u64, BuildHasherDefault<PreHashed>>;

/// The hasher of [`HashSet64`]: the key is a hash already.
#[derive(Debug, Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here (write_u64); fold anything else all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One lower directory's names (as hashes) and the handle they were read through.
///
/// Why hashes: a set answers "certainly not here" exactly as well with the names' 64-bit
/// hashes (a collision only costs a lookup that was not needed), at 9 bytes a name instead
/// of a copy of every name; rebuilding the listings of a large tree (the kernel drops its
/// cached listings under memory pressure) then barely raises the daemon's peak memory.
#[derive(Debug)]
struct NameSet {
    dir: Weak<OwnedFd>,
    hashes: HashSet64,
}

#[derive(Debug)]
struct Inner {
    sets: LruCache<(Ino, LayerIdx), NameSet>,
    total: usize,
}

/// What a lookup may skip: see the module documentation.
#[derive(Debug)]
pub struct LowerNames {
    inner: Mutex<Inner>,
    /// Keys of the name hashes (random per mount: names in a layer cannot be chosen to
    /// collide on purpose, not that a collision costs more than a lookup).
    keys: RandomState,
}

/// The names of one lower directory, gathered while its listing is read (see
/// [`LowerNames::names`]) and kept by [`LowerNames::remember`].
#[derive(Debug)]
pub struct DirNames {
    keys: RandomState,
    /// `None` once the directory has more names than are worth keeping.
    hashes: Option<HashSet64>,
}

impl DirNames {
    /// Adds one name `getdents` gave (whiteout files included).
    pub fn add(&mut self, name: &OsStr) {
        if let Some(set) = self.hashes.as_mut() {
            if set.len() >= MAX_NAMES_PER_DIR {
                self.hashes = None;
            } else {
                set.insert(name_hash(&self.keys, b"", name));
            }
        }
    }
}

/// The hash of `prefix` followed by `name`, so that the `.wh.` whiteout name of a name is
/// hashed without building it.
fn name_hash(keys: &RandomState, prefix: &[u8], name: &OsStr) -> u64 {
    let mut h = keys.build_hasher();
    h.write(prefix);
    h.write(name.as_bytes());
    h.finish()
}

impl Default for LowerNames {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_DIRS).unwrap_or(NonZeroUsize::MIN);
        LowerNames {
            inner: Mutex::new(Inner {
                sets: LruCache::new(cap),
                total: 0,
            }),
            keys: RandomState::new(),
        }
    }
}

impl LowerNames {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty set of names to fill while a lower directory is read.
    pub fn names(&self) -> DirNames {
        DirNames {
            keys: self.keys.clone(),
            hashes: Some(HashSet64::default()),
        }
    }

    /// Keeps `names` (every name `getdents` gave, whiteout files included) as the contents of
    /// the lower directory behind `dir`, node `ino`'s directory in `layer`.
    pub fn remember(&self, ino: Ino, layer: LayerIdx, dir: &Arc<OwnedFd>, names: DirNames) {
        let Some(mut hashes) = names.hashes.filter(|_| !layer.is_upper()) else {
            return;
        };
        hashes.shrink_to_fit();
        let mut inner = self.lock();
        let added = hashes.len();
        let set = NameSet {
            dir: Arc::downgrade(dir),
            hashes,
        };
        if let Some((_, old)) = inner.sets.push((ino, layer), set) {
            inner.total -= old.hashes.len();
        }
        inner.total += added;
        while inner.total > MAX_NAMES {
            match inner.sets.pop_lru() {
                Some((_, old)) => inner.total -= old.hashes.len(),
                None => break,
            }
        }
    }

    /// `Some(false)` when the lower directory behind `dir` certainly holds neither `name` nor
    /// its `.wh.` whiteout file; `None` when its names are not known.
    pub fn may_hold(
        &self,
        ino: Ino,
        layer: LayerIdx,
        dir: &Arc<OwnedFd>,
        name: &OsStr,
    ) -> Option<bool> {
        let plain = name_hash(&self.keys, b"", name);
        let whiteout = name_hash(&self.keys, whiteout::WH_PREFIX, name);
        let mut inner = self.lock();
        let set = inner.sets.get(&(ino, layer))?;
        if !std::ptr::eq(set.dir.as_ptr(), Arc::as_ptr(dir)) {
            return None;
        }
        Some(set.hashes.contains(&plain) || set.hashes.contains(&whiteout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open("/").expect("open /")))
    }

    fn set<S: AsRef<OsStr>>(names: &LowerNames, list: &[S]) -> DirNames {
        let mut set = names.names();
        for n in list {
            set.add(n.as_ref());
        }
        set
    }

    #[test]
    fn answers_only_for_the_handle_it_was_read_through() {
        let names = LowerNames::default();
        let (a, b) = (fd(), fd());
        let lower = LayerIdx(1);
        names.remember(Ino(7), lower, &a, set(&names, &["x", ".wh.gone"]));
        assert_eq!(
            names.may_hold(Ino(7), lower, &a, OsStr::new("x")),
            Some(true)
        );
        assert_eq!(
            names.may_hold(Ino(7), lower, &a, OsStr::new("gone")),
            Some(true)
        );
        assert_eq!(
            names.may_hold(Ino(7), lower, &a, OsStr::new("y")),
            Some(false)
        );
        assert_eq!(names.may_hold(Ino(7), lower, &b, OsStr::new("y")), None);
        assert_eq!(names.may_hold(Ino(8), lower, &a, OsStr::new("y")), None);
    }

    #[test]
    fn upper_is_never_kept_and_names_are_bounded() {
        let names = LowerNames::default();
        let a = fd();
        names.remember(Ino(7), LayerIdx::UPPER, &a, set(&names, &["x"]));
        assert_eq!(
            names.may_hold(Ino(7), LayerIdx::UPPER, &a, OsStr::new("y")),
            None
        );
        let big: Vec<String> = (0..MAX_NAMES_PER_DIR).map(|i| i.to_string()).collect();
        for i in 0..8 {
            names.remember(Ino(100 + i), LayerIdx(1), &a, set(&names, &big));
        }
        assert!(names.lock().total <= MAX_NAMES);
        assert_eq!(
            names.may_hold(Ino(100), LayerIdx(1), &a, OsStr::new("z")),
            None
        );
        assert_eq!(
            names.may_hold(Ino(107), LayerIdx(1), &a, OsStr::new("z")),
            Some(false)
        );
        assert_eq!(
            names.may_hold(Ino(107), LayerIdx(1), &a, OsStr::new("77")),
            Some(true)
        );
    }

    #[test]
    fn a_directory_with_too_many_names_is_not_kept() {
        let names = LowerNames::default();
        let a = fd();
        let huge: Vec<String> = (0..=MAX_NAMES_PER_DIR).map(|i| i.to_string()).collect();
        names.remember(Ino(9), LayerIdx(1), &a, set(&names, &huge));
        assert_eq!(
            names.may_hold(Ino(9), LayerIdx(1), &a, OsStr::new("none")),
            None
        );
    }

    #[test]
    fn the_whiteout_hash_is_the_hash_of_the_whiteout_name() {
        let keys = RandomState::new();
        let built = whiteout::wh_name(OsStr::new("f"));
        assert_eq!(
            name_hash(&keys, whiteout::WH_PREFIX, OsStr::new("f")),
            name_hash(&keys, b"", &built)
        );
    }
}
