//! Typed errors, and the one place that turns a core error into an errno.
//!
//! Core functions return [`Error`]; the FUSE adapter calls [`Error::errno`] and nothing else
//! decides an errno. Adding a variant forces a decision here (the match is exhaustive).
//! Mount-time problems are [`SetupError`]s: they never reach the kernel, they become one line
//! on stderr and a non-zero exit.

use std::io;
use std::path::PathBuf;

/// An error answering a filesystem request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a layer failed; its errno is passed through unchanged (EACCES,
    /// ENOTDIR, ENOSPC ... mean the same to the caller as to us).
    #[error("{op}: {source}")]
    Io {
        /// What we were doing, for the log.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The name does not exist in the merged view (absent, or hidden by a whiteout or an
    /// opaque directory).
    #[error("no such entry")]
    NotFound,
    /// A name longer than `NAME_MAX` (255 bytes).
    #[error("name too long")]
    NameTooLong,
    /// A name that can never be looked up (contains `/`, or is empty).
    #[error("invalid name")]
    InvalidName,
    /// A write to a mount without an upper layer.
    #[error("read-only overlay")]
    ReadOnly,
    /// The request names an inode the kernel should not know about (already forgotten).
    #[error("unknown inode {0}")]
    StaleInode(u64),
    /// The request names a file handle we never handed out.
    #[error("unknown file handle {0}")]
    BadHandle(u64),
    /// A directory operation on a non-directory.
    #[error("not a directory")]
    NotDir,
    /// An extended attribute that does not exist, or one of the overlay's private ones.
    #[error("no such attribute")]
    NoXattr,
    /// The caller's buffer is too small for the reply.
    #[error("buffer too small")]
    Range,
    /// Extended attributes are turned off (`noxattrs=1`).
    #[error("operation not supported")]
    NotSupported,
    /// `mknod` of a whiteout (a 0/0 character device) through the mount: it would hide a
    /// name instead of creating one, so overlayfs refuses it.
    #[error("whiteout devices cannot be created through the overlay")]
    WhiteoutDevice,
    /// Permission check failed in the daemon (only without `default_permissions`).
    #[error("permission denied")]
    PermissionDenied,
    /// A lower layer changed under the mount: the object at a name is not the one the merged
    /// view knows (overlayfs leaves this undefined; we answer ESTALE rather than guess).
    #[error("lower layer changed while mounted")]
    StaleLower,
    /// A state that should be impossible; logged, and the caller sees EIO rather than a
    /// crashed daemon.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// Wraps an `io::Error` from a layer system call.
    pub fn io(op: &'static str, source: io::Error) -> Self {
        Error::Io { op, source }
    }

    /// The errno the kernel (and so the caller) sees.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NotFound => libc::ENOENT,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::InvalidName => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::StaleInode(_) => libc::ESTALE,
            Error::BadHandle(_) => libc::EBADF,
            Error::NotDir => libc::ENOTDIR,
            Error::NoXattr => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::NotSupported => libc::EOPNOTSUPP,
            Error::WhiteoutDevice => libc::EPERM,
            Error::PermissionDenied => libc::EACCES,
            Error::StaleLower => libc::ESTALE,
            Error::Internal(_) => libc::EIO,
        }
    }

    /// Whether this error is worth a warning in the log (ordinary misses are not).
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            Error::Internal(_) | Error::StaleInode(_) | Error::BadHandle(_) | Error::StaleLower
        ) || matches!(self, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EIO))
    }
}

/// Shorthand for results of filesystem requests.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A problem found while parsing options or preparing the layers; nothing is mounted.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `lowerdir=` missing or empty.
    #[error("no lower layer given: use -o lowerdir=DIR[:DIR...]")]
    NoLowerdir,
    /// An empty element in `lowerdir=` (`a::b`, a trailing `:`).
    #[error("empty layer path in lowerdir={0:?} (data-only layers with '::' are not supported)")]
    EmptyLayer(String),
    /// More layers than the kernel allows.
    #[error("too many lower layers: {0} (the limit is {max})", max = crate::ovl::params::MAX_LOWER_LAYERS)]
    TooManyLayers(usize),
    /// A layer that cannot be opened as a directory.
    #[error("{role} {path:?}: {source}")]
    Layer {
        /// `lowerdir`, `upperdir` or `workdir`.
        role: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Why it failed (ENOENT, ENOTDIR, EACCES ...).
        source: io::Error,
    },
    /// `upperdir=` without `workdir=`.
    #[error("upperdir={0:?} needs a workdir= on the same filesystem")]
    MissingWorkdir(PathBuf),
    /// upper and work on different filesystems: renames from one to the other would fail.
    #[error("workdir {work:?} and upperdir {upper:?} must be on the same filesystem")]
    WorkdirOtherFs {
        /// The upper directory.
        upper: PathBuf,
        /// The work directory.
        work: PathBuf,
    },
    /// One of upper/work inside the other.
    #[error("workdir {work:?} and upperdir {upper:?} must not contain each other")]
    WorkdirNested {
        /// The upper directory.
        upper: PathBuf,
        /// The work directory.
        work: PathBuf,
    },
    /// The mountpoint is a layer, inside one, or contains one: the daemon would serve requests
    /// about its own mount (fuse-overlayfs hangs there: upstream #344, #364, #393).
    #[error("mountpoint {mountpoint:?} overlaps {role} {layer:?}")]
    MountpointOverlapsLayer {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Which kind of layer.
        role: &'static str,
        /// The layer path.
        layer: PathBuf,
    },
    /// The mountpoint does not exist or is not a directory.
    #[error("mountpoint {path:?}: {source}")]
    Mountpoint {
        /// The mountpoint as given.
        path: PathBuf,
        /// Why it is unusable.
        source: io::Error,
    },
    /// No mountpoint argument.
    #[error("no mountpoint given")]
    NoMountpoint,
    /// An option value we cannot honour.
    #[error("{option}: {reason}")]
    BadOption {
        /// The option as given.
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The workdir could not be prepared.
    #[error("workdir {path:?}: {source}")]
    Workdir {
        /// The workdir path.
        path: PathBuf,
        /// The failing step's error.
        source: io::Error,
    },
    /// Mounting (opening /dev/fuse, mount(2)) failed.
    #[error("mount on {path:?} failed: {source}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The kernel's answer.
        source: io::Error,
    },
}
