//! The inode table: one [`Node`] per object the kernel knows, keyed by its overlay inode
//! number, plus the rules that make `st_ino` stable and unique (kernel `fs/overlayfs/inode.c`:
//! `ovl_get_inode`, `ovl_map_ino`, `ovl_getattr`).
//!
//! The FUSE node id *is* the reported `st_ino` (fuser sends `attr.ino` as the node id), so two
//! names for the same real inode (hard links) share a node, exactly as they share an inode in
//! kernel overlayfs.
//!
//! Lock order: [`InodeTable::map`] before any [`Node`] state lock; neither is held across I/O
//! to a layer.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::{FileType, Stat};

use crate::error::{Error, Result};
use crate::ovl::layer::LayerIdx;

/// An overlay inode number: what the kernel uses as node id and shows as `st_ino` / `d_ino`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ino(pub u64);

impl Ino {
    /// The root directory (FUSE_ROOT_ID).
    pub const ROOT: Ino = Ino(1);
}

/// Where a merged object has a real counterpart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Real {
    /// The layer holding it.
    pub layer: LayerIdx,
    /// For directories: this layer's copy is marked `overlay.opaque=x`, i.e. it may hold
    /// xattr whiteouts that must be checked for (kernel `ovl_dentry_has_xwhiteouts`).
    pub xwhiteouts: bool,
    /// For upper directories: marked `overlay.impure`, so entries may carry an origin.
    pub impure: bool,
    /// Where in the layer the object is.
    pub loc: Loc,
}

impl Real {
    /// A real object at the node's own name under its parent's real directory.
    pub fn at(layer: LayerIdx) -> Real {
        Real {
            layer,
            xwhiteouts: false,
            impure: false,
            loc: Loc::Same,
        }
    }
}

/// Where a real object sits in its layer. Directory redirects (kernel `redirect_dir`) make a
/// merged directory's lower copies live somewhere other than its own path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Loc {
    /// Under the parent's real directory in the layer, with the node's own name.
    #[default]
    Same,
    /// Under the parent's real directory in the layer, with this name (relative redirect).
    Renamed(OsString),
    /// At this path from the layer's root (absolute redirect, or a directory moved since).
    Abs(std::path::PathBuf),
}

/// What can change about a node over its life (by copy-up and rename, on the write side).
#[derive(Debug, Clone)]
pub struct NodeState {
    /// The directory this node was found in; `None` only for the root. Holding the parent
    /// keeps the path to the real objects computable while the node lives.
    pub parent: Option<Arc<Node>>,
    /// The name in `parent` (for a hard-linked file: the first name it was found under).
    pub name: OsString,
    /// Real objects, top layer first. A directory has one per layer down to the first opaque
    /// one. A non-directory has the one that hides the rest, followed, once copied up, by its
    /// copy-up origin in a lower layer (kernel: the lower stack of an upper non-dir).
    pub reals: Vec<Real>,
    /// Set once the last name of the object was removed while the kernel still held it: a
    /// handle on the (now nameless) upper object, so `fstat` of an open, unlinked file works.
    pub detached: Option<Arc<OwnedFd>>,
    /// A metadata-only copy-up (kernel `metacopy=on`): the upper file holds the attributes,
    /// the data still comes from the lower file in `reals[1]`.
    pub metacopy: bool,
    /// The upper copy records an `overlay.origin` (kernel `OVL_TYPE_ORIGIN` for non-dirs).
    pub origin: bool,
    /// With `index=on`: the upper copy of this lower hard link, reachable only through the
    /// index so far (none of its names is in the upper layer): attributes and data come from
    /// it.
    pub index_copy: Option<Arc<OwnedFd>>,
    /// With `index=on`: a hard link recorded in the index, whose link count is the one its
    /// `overlay.nlink` xattr keeps (kernel `OVL_INDEX`).
    pub indexed: bool,
}

impl NodeState {
    /// The state of an object just found at `name` in `parent` (None: the root) with its
    /// real objects `reals`: no copy-up history yet, not detached, not indexed.
    pub fn new(parent: Option<Arc<Node>>, name: OsString, reals: Vec<Real>) -> NodeState {
        NodeState {
            parent,
            name,
            reals,
            detached: None,
            metacopy: false,
            origin: false,
            index_copy: None,
            indexed: false,
        }
    }
}

/// A merged object the kernel holds a reference to.
#[derive(Debug)]
pub struct Node {
    /// Its overlay inode number.
    pub ino: Ino,
    /// The file type; fixed for the node's life.
    pub file_type: FileType,
    /// FUSE generation: bumped when an inode number is reused by a new object after the old
    /// one was removed, so the kernel can tell the two apart.
    pub generation: u64,
    /// The object is gone from the merged view (last name removed); a new object may take
    /// over its inode number.
    pub dead: std::sync::atomic::AtomicBool,
    /// The kernel's lookup count (FUSE `nlookup`); the node leaves the table at zero.
    lookups: AtomicU64,
    state: RwLock<NodeState>,
    /// Serialises copy-up of this node (lock order: after the parent's, before any table lock).
    pub copy_up_lock: Mutex<()>,
}

impl Node {
    /// Whether the upper object came from a lower one (kernel `OVL_TYPE_ORIGIN`): moving or
    /// linking it into a directory makes that directory impure.
    pub fn has_origin(&self) -> bool {
        let st = self.state();
        let upper = st.reals.first().is_some_and(|r| r.layer.is_upper());
        // A merged directory always counts; a non-directory when it records an origin.
        upper
            && if self.is_dir() {
                st.reals.len() > 1
            } else {
                st.origin
            }
    }

    /// Creates a node with no kernel references yet.
    pub fn new(ino: Ino, file_type: FileType, state: NodeState) -> Node {
        Node {
            ino,
            file_type,
            generation: 0,
            dead: std::sync::atomic::AtomicBool::new(false),
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
        }
    }

    /// Whether the node is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == FileType::Directory
    }

    /// Read access to the mutable part. A poisoned lock (a panic elsewhere) is not fatal:
    /// the state is still consistent because every writer replaces whole fields.
    pub fn state(&self) -> RwLockReadGuard<'_, NodeState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the mutable part.
    pub fn state_mut(&self) -> RwLockWriteGuard<'_, NodeState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The topmost real object (the one whose attributes and data the merged view shows).
    pub fn top(&self) -> Result<Real> {
        self.state()
            .reals
            .first()
            .cloned()
            // Only placeholders for vanished names have none.
            .ok_or(Error::NotFound)
    }

    /// Where the node's real object in `layer` is (its own name when not recorded).
    pub fn loc_in(&self, layer: LayerIdx) -> Loc {
        self.state()
            .reals
            .iter()
            .find(|r| r.layer == layer)
            .map(|r| r.loc.clone())
            .unwrap_or_default()
    }

    /// Whether the top real object is in the upper layer.
    pub fn is_upper(&self) -> bool {
        self.state()
            .reals
            .first()
            .is_some_and(|r| r.layer.is_upper())
    }

    /// The real object holding the data: the lower one for a metadata-only copy-up, else the
    /// top one.
    pub fn data_real(&self) -> Result<Real> {
        let st = self.state();
        let idx = usize::from(st.metacopy);
        st.reals
            .get(idx)
            .cloned()
            .ok_or(Error::Internal("node without a data object"))
    }

    /// The node's real objects below the upper layer, top first.
    pub fn lower_reals(&self) -> Vec<Real> {
        self.state()
            .reals
            .iter()
            .filter(|r| !r.layer.is_upper())
            .cloned()
            .collect()
    }

    /// Whether the node is a merged directory (real directories in more than one layer):
    /// kernel `OVL_TYPE_MERGE`.
    pub fn is_merged_dir(&self) -> bool {
        self.is_dir() && self.state().reals.len() > 1
    }

    /// The parent node and this node's name in it.
    pub fn parent_and_name(&self) -> (Option<Arc<Node>>, OsString) {
        let st = self.state();
        (st.parent.clone(), st.name.clone())
    }
}

/// All nodes the kernel may name in a request.
///
/// Why shards: every request starts by finding its node here, and lookups, creates and
/// forgets insert and remove; one lock made the threads of a `create`/`rm -rf` storm wait for
/// each other. A node lives in the shard its number picks; nothing spans two shards.
#[derive(Debug, Default)]
pub struct InodeTable {
    shards: [RwLock<InoMapShard>; SHARDS],
}

/// One shard of the table.
type InoMapShard = HashMap<Ino, Arc<Node>, BuildInoHasher>;

/// Shards of the inode table (a power of two).
const SHARDS: usize = 16;

impl InodeTable {
    /// Installs the root node (never forgotten).
    pub fn set_root(&self, root: Arc<Node>) {
        self.shard_mut(Ino::ROOT).insert(Ino::ROOT, root);
    }

    /// The node for `ino`, if the kernel may still use it.
    pub fn get(&self, ino: Ino) -> Result<Arc<Node>> {
        self.shard(ino)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .cloned()
            .ok_or(Error::StaleInode(ino.0))
    }

    /// Returns the node already known under `candidate.ino` if it is the same kind of object,
    /// else installs `candidate`; either way counts one kernel lookup.
    pub fn get_or_insert(&self, mut candidate: Node) -> Arc<Node> {
        let mut map = self.shard_mut(candidate.ino);
        let node = match map.get(&candidate.ino) {
            Some(existing)
                if existing.file_type == candidate.file_type
                    && !existing.dead.load(Ordering::Relaxed) =>
            {
                if existing.is_dir() {
                    // Same directory reached again: its layer set is what was just found,
                    // except that a copy-up which finished after this lookup looked at the
                    // layers is kept (it is never undone while the node lives; forgetting it
                    // made the next copy-up of the directory fail with EEXIST).
                    let mut found = candidate.state().reals.clone();
                    let mut state = existing.state_mut();
                    let had_upper = state.reals.first().filter(|r| r.layer.is_upper());
                    if let Some(upper) = had_upper {
                        if !found.first().is_some_and(|r| r.layer.is_upper()) {
                            found.insert(0, upper.clone());
                        }
                    }
                    state.reals = found;
                }
                existing.clone()
            }
            Some(old) => {
                // The number now names a different object: a new generation, which inherits
                // the kernel's outstanding references (forgets carry only the number).
                candidate.generation = old.generation + 1;
                candidate.lookups = AtomicU64::new(old.lookups.load(Ordering::Relaxed));
                let node = Arc::new(candidate);
                map.insert(node.ino, node.clone());
                node
            }
            None => {
                let node = Arc::new(candidate);
                map.insert(node.ino, node.clone());
                node
            }
        };
        node.lookups.fetch_add(1, Ordering::Relaxed);
        node
    }

    /// The node to hand out for a name a directory stream listed but that is gone now:
    /// the live node with that number if there is one, else a dead placeholder, so that the
    /// kernel's reference is counted and later requests on it fail cleanly. Counts one lookup.
    pub fn get_or_insert_ghost(&self, ghost: Node) -> Arc<Node> {
        let mut map = self.shard_mut(ghost.ino);
        let node = match map.get(&ghost.ino) {
            Some(existing) => existing.clone(),
            None => {
                ghost.dead.store(true, Ordering::Relaxed);
                let node = Arc::new(ghost);
                map.insert(node.ino, node.clone());
                node
            }
        };
        node.lookups.fetch_add(1, Ordering::Relaxed);
        node
    }

    /// Counts one more kernel reference to an existing node (readdirplus entries).
    pub fn add_lookup(&self, node: &Node) {
        node.lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops `n` kernel references; the node leaves the table when none remain.
    pub fn forget(&self, ino: Ino, n: u64) {
        if ino == Ino::ROOT {
            return;
        }
        let mut map = self.shard_mut(ino);
        if let Some(node) = map.get(&ino) {
            let prev = node
                .lookups
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(n))
                })
                .unwrap_or(0);
            if prev <= n {
                map.remove(&ino);
            }
        }
    }

    /// Number of nodes held (for logs and the memory benchmarks).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether only the root is left.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    fn shard(&self, ino: Ino) -> &RwLock<InoMapShard> {
        // The low bits of a real inode number vary most; fold in the filesystem bits too.
        let i = (ino.0 ^ (ino.0 >> 48)) as usize & (SHARDS - 1);
        &self.shards[i]
    }

    fn shard_mut(&self, ino: Ino) -> RwLockWriteGuard<'_, InoMapShard> {
        self.shard(ino).write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Hashes inode numbers for the table: they are already unique integers, so a multiply and
/// fold spreads them well enough, at a fraction of SipHash's cost (no untrusted keys here:
/// numbers come from the layers' filesystems, not from callers).
#[derive(Debug, Default, Clone, Copy)]
struct BuildInoHasher;

impl std::hash::BuildHasher for BuildInoHasher {
    type Hasher = InoHasher;
    fn build_hasher(&self) -> InoHasher {
        InoHasher(0)
    }
}

/// See [`BuildInoHasher`].
#[derive(Debug)]
struct InoHasher(u64);

impl std::hash::Hasher for InoHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Maps (filesystem, real inode) to an overlay inode number that is unique across layers on
/// different filesystems: the kernel's `xino` scheme, with the filesystem id in the high bits.
#[derive(Debug)]
pub struct InoMap {
    /// Bits reserved at the top for the filesystem id (0 when all layers share one).
    fsid_bits: u32,
    /// Numbers handed out when a real inode does not fit (or would be 0 or 1).
    fallback: Mutex<HashMap<(u16, u64), u64>>,
    next_fallback: AtomicU64,
}

impl InoMap {
    /// A map for layers spread over `fs_count` filesystems.
    pub fn new(fs_count: u16) -> InoMap {
        let fsid_bits = if fs_count <= 1 {
            0
        } else {
            u32::BITS - u32::from(fs_count - 1).leading_zeros()
        };
        InoMap {
            fsid_bits,
            fallback: Mutex::new(HashMap::new()),
            next_fallback: AtomicU64::new(u64::MAX),
        }
    }

    /// A fresh number that no real inode maps to.
    pub fn alloc(&self) -> Ino {
        Ino(self.next_fallback.fetch_sub(1, Ordering::Relaxed))
    }

    /// The overlay inode number for real inode `ino` on filesystem `fsid`.
    pub fn map(&self, fsid: u16, ino: u64) -> Ino {
        let mapped = if self.fsid_bits == 0 {
            Some(ino)
        } else if ino >> (64 - self.fsid_bits) == 0 {
            Some(ino | (u64::from(fsid) << (64 - self.fsid_bits)))
        } else {
            None
        };
        match mapped {
            Some(m) if m > Ino::ROOT.0 && m < self.next_fallback.load(Ordering::Relaxed) => Ino(m),
            _ => {
                let mut fb = self.fallback.lock().unwrap_or_else(|e| e.into_inner());
                Ino(*fb
                    .entry((fsid, ino))
                    .or_insert_with(|| self.next_fallback.fetch_sub(1, Ordering::Relaxed)))
            }
        }
    }
}

/// The attributes shown for `node`, given the `lstat` of its top real object: the overlay
/// inode number, and the kernel's link count rule for merged directories (`ovl_getattr`:
/// "nlink=1 seems to pacify 'find' and other utilities").
pub fn overlay_stat(node: &Node, mut st: Stat, static_nlink: bool) -> Stat {
    st.st_ino = node.ino.0;
    if node.is_dir() && (static_nlink || node.is_merged_dir()) {
        st.st_nlink = 1;
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_node(ino: u64, reals: Vec<Real>) -> Node {
        Node::new(
            Ino(ino),
            FileType::Directory,
            NodeState::new(None, "d".into(), reals),
        )
    }

    #[test]
    fn lookup_racing_a_copy_up_keeps_the_upper_copy() {
        let table = InodeTable::default();
        let lower = Real::at(LayerIdx(1));
        let node = table.get_or_insert(dir_node(77, vec![lower.clone()]));
        // The copy-up lands...
        node.state_mut().reals.insert(0, Real::at(LayerIdx::UPPER));
        // ...then a lookup that saw the layers before it reports the lower copy only.
        let again = table.get_or_insert(dir_node(77, vec![lower.clone()]));
        assert!(Arc::ptr_eq(&node, &again));
        assert_eq!(
            again.state().reals,
            vec![Real::at(LayerIdx::UPPER), lower.clone()]
        );
        // A lookup that found a different layer set still replaces the lower part.
        let other = Real::at(LayerIdx(2));
        table.get_or_insert(dir_node(77, vec![Real::at(LayerIdx::UPPER), other.clone()]));
        assert_eq!(node.state().reals, vec![Real::at(LayerIdx::UPPER), other]);
    }

    #[test]
    fn single_fs_passes_inodes_through() {
        let m = InoMap::new(1);
        assert_eq!(m.map(0, 1234), Ino(1234));
    }

    #[test]
    fn several_fs_get_distinct_numbers() {
        let m = InoMap::new(3);
        let a = m.map(0, 42);
        let b = m.map(1, 42);
        let c = m.map(2, 42);
        assert!(a != b && b != c && a != c);
        assert_eq!(m.map(1, 42), b, "stable");
    }

    #[test]
    fn root_number_and_overflow_use_fallback() {
        let m = InoMap::new(2);
        let one = m.map(0, 1);
        assert_ne!(one, Ino::ROOT);
        let big = m.map(1, u64::MAX - 5);
        assert_eq!(m.map(1, u64::MAX - 5), big);
        assert_ne!(big, one);
    }
}
