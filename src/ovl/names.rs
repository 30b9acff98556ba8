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
//! longer consulted. Capacity is bounded in directories and in names.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};

use lru::LruCache;

use crate::ovl::inode::Ino;
use crate::ovl::layer::LayerIdx;
use crate::ovl::whiteout;

/// Directories whose names are kept.
const MAX_DIRS: usize = 512;
/// Names kept over all directories (about 70 bytes each).
const MAX_NAMES: usize = 128 * 1024;

/// One lower directory's names and the handle they were read through.
#[derive(Debug)]
struct NameSet {
    dir: Weak<OwnedFd>,
    names: HashSet<OsString>,
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
}

impl Default for LowerNames {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_DIRS).unwrap_or(NonZeroUsize::MIN);
        LowerNames {
            inner: Mutex::new(Inner {
                sets: LruCache::new(cap),
                total: 0,
            }),
        }
    }
}

impl LowerNames {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `names` (every name `getdents` gave, whiteout files included) as the contents of
    /// the lower directory behind `dir`, node `ino`'s directory in `layer`.
    pub fn remember<'a>(
        &self,
        ino: Ino,
        layer: LayerIdx,
        dir: &Arc<OwnedFd>,
        names: impl ExactSizeIterator<Item = &'a OsStr>,
    ) {
        // Checked before copying a name: a huge directory is not worth its memory.
        if layer.is_upper() || names.len() > MAX_NAMES / 4 {
            return;
        }
        let names: HashSet<OsString> = names.map(OsStr::to_owned).collect();
        let mut inner = self.lock();
        let added = names.len();
        let set = NameSet {
            dir: Arc::downgrade(dir),
            names,
        };
        if let Some((_, old)) = inner.sets.push((ino, layer), set) {
            inner.total -= old.names.len();
        }
        inner.total += added;
        while inner.total > MAX_NAMES {
            match inner.sets.pop_lru() {
                Some((_, old)) => inner.total -= old.names.len(),
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
        let mut inner = self.lock();
        let set = inner.sets.get(&(ino, layer))?;
        if !std::ptr::eq(set.dir.as_ptr(), Arc::as_ptr(dir)) {
            return None;
        }
        Some(set.names.contains(name) || set.names.contains(&whiteout::wh_name(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open("/").expect("open /")))
    }

    fn set(names: &[&str]) -> HashSet<OsString> {
        names.iter().map(OsString::from).collect()
    }

    #[test]
    fn answers_only_for_the_handle_it_was_read_through() {
        let names = LowerNames::default();
        let (a, b) = (fd(), fd());
        let lower = LayerIdx(1);
        names.remember(
            Ino(7),
            lower,
            &a,
            set(&["x", ".wh.gone"]).iter().map(|n| n.as_os_str()),
        );
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
        names.remember(
            Ino(7),
            LayerIdx::UPPER,
            &a,
            set(&["x"]).iter().map(|n| n.as_os_str()),
        );
        assert_eq!(
            names.may_hold(Ino(7), LayerIdx::UPPER, &a, OsStr::new("y")),
            None
        );
        let big: HashSet<OsString> = (0..MAX_NAMES / 4)
            .map(|i| OsString::from(i.to_string()))
            .collect();
        for i in 0..8 {
            names.remember(
                Ino(100 + i),
                LayerIdx(1),
                &a,
                big.iter().map(|n| n.as_os_str()),
            );
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
    }
}
