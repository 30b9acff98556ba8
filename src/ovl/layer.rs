//! Layers: the upper (index 0) and the lowers (1..), each an open root directory plus the
//! device it lives on, opened and checked once at mount time.
//!
//! Mirrors kernel `fs/overlayfs/super.c` (`ovl_get_layers`, `ovl_get_upper`, `ovl_get_workdir`
//! and their sanity checks). Host paths are used only here; everything afterwards is
//! fd-relative.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::error::SetupError;
use crate::ovl::override_stat::OverrideXattr;
use crate::ovl::params::Config;
use crate::sys;

/// Index of a layer in the stack: 0 is the upper layer (when there is one), lowers follow
/// top to bottom from 1, as in the kernel's `ovl_layer.idx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerIdx(pub u16);

impl LayerIdx {
    /// The upper layer's index.
    pub const UPPER: LayerIdx = LayerIdx(0);

    /// Whether this is the upper layer.
    pub fn is_upper(self) -> bool {
        self == Self::UPPER
    }
}

/// One layer of the stack.
#[derive(Debug)]
pub struct Layer {
    /// Position in the stack.
    pub idx: LayerIdx,
    /// `O_PATH` handle on the layer's root directory; every access starts here.
    pub root: Arc<OwnedFd>,
    /// `st_dev` of the root, to tell layers on different filesystems apart.
    pub dev: u64,
    /// Small number identifying `dev` among the layers (0 = the upper's filesystem), used to
    /// keep inode numbers unique across filesystems (kernel `xino`).
    pub fsid: u16,
    /// The path the user gave, for messages.
    pub path: PathBuf,
    /// UUID of the layer's filesystem (zeros if none), for origin records.
    pub uuid: [u8; 16],
    /// The attribute this layer keeps owners and modes in, if it does (its root carries
    /// one, or `xattr_permissions=` for the upper layer).
    pub stat_override: Option<OverrideXattr>,
}

/// The whole stack, opened.
#[derive(Debug)]
pub struct Layers {
    /// Slot 0 is the upper layer (or `None`), then the lowers top first; indexable by
    /// [`LayerIdx`].
    slots: Vec<Option<Layer>>,
    /// `workdir/work`, emptied at mount; where copy-ups are prepared.
    pub work: Option<OwnedFd>,
    /// `workdir/index` with `index=on`: upper copies of lower hard links, by origin.
    pub index: Option<OwnedFd>,
    /// How many distinct filesystems the layers sit on.
    pub fs_count: u16,
    /// Whether any layer keeps owners in an override attribute (then every attribute
    /// shown is checked for one).
    pub any_override: bool,
}

/// Name of our private directory inside `workdir=` (the same as the kernel's and
/// fuse-overlayfs's, so that a workdir can move between them).
const WORK_SUBDIR: &str = "work";
/// The kernel's inode index directory inside `workdir=` (`index=on`).
const INDEX_SUBDIR: &str = "index";

impl Layers {
    /// Opens and checks every layer of `cfg` for a mount on `mountpoint`.
    pub fn open(cfg: &Config, mountpoint: &Path) -> Result<Layers, SetupError> {
        let mnt = canonical(mountpoint).map_err(|source| SetupError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        let mnt_fd = sys::fs::open_host_dir(&mnt).map_err(|source| SetupError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        drop(mnt_fd);

        let mut devs: Vec<u64> = Vec::new();
        let mut fsid_of = |dev: u64| -> u16 {
            match devs.iter().position(|d| *d == dev) {
                Some(i) => i as u16,
                None => {
                    devs.push(dev);
                    (devs.len() - 1) as u16
                }
            }
        };

        let mut slots = Vec::with_capacity(cfg.lowerdirs.len() + 1);
        let mut work = None;
        let mut index = None;
        match &cfg.upperdir {
            Some(upper) => {
                let (root, dev, canon) = open_layer_root("upperdir", upper, &mnt)?;
                let workdir = cfg
                    .workdir
                    .as_ref()
                    .ok_or_else(|| SetupError::MissingWorkdir(upper.clone()))?;
                let (work_root, work_dev, work_canon) = open_layer_root("workdir", workdir, &mnt)?;
                if work_dev != dev {
                    return Err(SetupError::WorkdirOtherFs {
                        upper: upper.clone(),
                        work: workdir.clone(),
                    });
                }
                if work_canon.starts_with(&canon) || canon.starts_with(&work_canon) {
                    return Err(SetupError::WorkdirNested {
                        upper: upper.clone(),
                        work: workdir.clone(),
                    });
                }
                work = Some(prepare_workdir(work_root.as_fd()).map_err(|source| {
                    SetupError::Workdir {
                        path: workdir.clone(),
                        source,
                    }
                })?);
                if cfg.index && !cfg.read_only {
                    index = Some(open_index_dir(work_root.as_fd()).map_err(|source| {
                        SetupError::Workdir {
                            path: workdir.clone(),
                            source,
                        }
                    })?);
                }
                slots.push(Some(Layer {
                    idx: LayerIdx::UPPER,
                    dev,
                    fsid: fsid_of(dev),
                    path: upper.clone(),
                    uuid: [0; 16],
                    stat_override: cfg
                        .xattr_permissions
                        .or_else(|| OverrideXattr::detect(root.as_fd())),
                    root: Arc::new(root),
                }));
            }
            None => slots.push(None),
        }
        let maps_ids = !cfg.ids.uids.ranges.is_empty() || !cfg.ids.gids.ranges.is_empty();
        for (i, lower) in cfg.lowerdirs.iter().enumerate() {
            let (mut root, dev, canon) = open_layer_root("lowerdir", lower, &mnt)?;
            if maps_ids {
                root = unmapped_lower(root, &canon, lower);
            }
            let uuid = sys::fs::fs_uuid(root.as_fd());
            slots.push(Some(Layer {
                idx: LayerIdx(i as u16 + 1),
                dev,
                fsid: fsid_of(dev),
                path: lower.clone(),
                uuid,
                stat_override: OverrideXattr::detect(root.as_fd()),
                root: Arc::new(root),
            }));
        }
        let any_override = slots.iter().flatten().any(|l| l.stat_override.is_some());
        Ok(Layers {
            slots,
            work,
            index,
            fs_count: devs.len() as u16,
            any_override,
        })
    }

    /// The layer at `idx`. Indices come only from this stack, so a miss is a bug; it is
    /// reported as `None` rather than a panic.
    pub fn get(&self, idx: LayerIdx) -> Option<&Layer> {
        self.slots.get(idx.0 as usize).and_then(Option::as_ref)
    }

    /// The root directory of layer `idx`.
    pub fn root(&self, idx: LayerIdx) -> Option<BorrowedFd<'_>> {
        self.get(idx).map(|l| l.root.as_fd())
    }

    /// The upper layer, if the mount has one.
    pub fn upper(&self) -> Option<&Layer> {
        self.get(LayerIdx::UPPER)
    }

    /// Every layer, top first (upper, then lowers).
    pub fn stack(&self) -> impl Iterator<Item = &Layer> {
        self.slots.iter().flatten()
    }

    /// The layer whose filesystem `statfs` reports: the upper, else the top lower.
    pub fn statfs_layer(&self) -> Option<&Layer> {
        self.stack().next()
    }
}

/// Opens a user-given layer directory and checks that it does not overlap the mountpoint.
fn open_layer_root(
    role: &'static str,
    path: &Path,
    mnt: &Path,
) -> Result<(OwnedFd, u64, PathBuf), SetupError> {
    let err = |source: io::Error| SetupError::Layer {
        role,
        path: path.to_path_buf(),
        source,
    };
    let canon = canonical(path).map_err(err)?;
    let root = sys::fs::open_host_dir(&canon).map_err(err)?;
    let st = sys::fs::stat_fd(root.as_fd()).map_err(err)?;
    if canon.starts_with(mnt) || mnt.starts_with(&canon) {
        return Err(SetupError::MountpointOverlapsLayer {
            mountpoint: mnt.to_path_buf(),
            role,
            layer: path.to_path_buf(),
        });
    }
    Ok((root, st.st_dev, canon))
}

/// With `uidmapping=`/`gidmapping=`, a lower on an idmapped mount is read through a plain
/// mount of the same filesystem instead, so that the ids are shifted once, by the options.
///
/// Why: podman 4.3 (containers-storage 1.45) as root with a mount program and `--uidmap`
/// passes lowers under `<graphroot>/overlay/<id>/mapped/N/`, idmapped mounts already shifted
/// to the container's ids, *and* `uidmapping=` for the same shift; read as given, every owner
/// would show as the overflow id and runc fails (fuse-overlayfs 1.10 fails the same way).
/// When no plain mount reaches the same inode, the layer is kept as given, with a warning.
fn unmapped_lower(root: OwnedFd, canon: &Path, given: &Path) -> OwnedFd {
    match sys::mountinfo::open_unmapped(root.as_fd(), canon) {
        Ok(None) => root,
        Ok(Some(plain)) => {
            info!(lower = ?given, "lowerdir is an idmapped mount: read through a plain mount, ids are shifted by uidmapping=/gidmapping= only");
            plain
        }
        Err(why) => {
            warn!(lower = ?given, "lowerdir may be an idmapped mount and uidmapping=/gidmapping= is given: owners will be shifted twice ({why})");
            root
        }
    }
}

/// `realpath`, with ENOTDIR for things that are not directories.
fn canonical(path: &Path) -> io::Result<PathBuf> {
    let canon = std::fs::canonicalize(path)?;
    if !std::fs::metadata(&canon)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    Ok(canon)
}

/// Opens `workdir/index` (the kernel's name), creating it (mode 0700) if needed; unlike
/// `work` it is kept across mounts.
fn open_index_dir(workdir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let name = OsStr::new(INDEX_SUBDIR);
    match sys::fs::make_dir(workdir, name, 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    sys::fs::open_dir_path(workdir, name)
}

/// Creates `workdir/work` (mode 0700) and empties it: whatever a killed daemon left there is
/// an unfinished operation whose target was never renamed into place.
fn prepare_workdir(workdir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let name = OsStr::new(WORK_SUBDIR);
    match sys::fs::stat_name(workdir, name) {
        Ok(st)
            if rustix::fs::FileType::from_raw_mode(st.st_mode)
                == rustix::fs::FileType::Directory => {}
        Ok(_) => {
            sys::fs::remove_tree(workdir, name)?;
            sys::fs::make_dir(workdir, name, 0o700)?;
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            sys::fs::make_dir(workdir, name, 0o700)?
        }
        Err(e) => return Err(e),
    }
    let work = sys::fs::open_dir_path(workdir, name)?;
    for entry in sys::fs::read_dir(work.as_fd())? {
        sys::fs::remove_tree(work.as_fd(), &entry.name)?;
    }
    Ok(work)
}
