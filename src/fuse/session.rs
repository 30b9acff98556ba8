//! Mount setup and the life of the daemon: check everything, fork, mount, tell the waiting
//! parent, serve until unmounted (by `fusermount3 -u`, `umount` or SIGTERM/SIGINT/SIGHUP).
//!
//! The parent process exits only once the mount is live (or failed), which is what
//! containers-storage and podman rely on when they run a mount program.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{MountOption, SessionACL};
use tracing::{error, info, warn};

use crate::error::SetupError;
use crate::fuse::OverlayFs;
use crate::fuse::busy_poll::{BusyPoll, Readers};
use crate::ovl::Overlay;
use crate::ovl::layer::Layers;
use crate::ovl::params::Config;
use crate::sys;
use crate::sys::process::{ChildStatus, Forked, StatusWriter};

/// How to run a mount.
#[derive(Debug)]
pub struct MountRequest {
    /// Parsed `-o` options.
    pub cfg: Config,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// The `SOURCE` argument (`mount -t fuse.stratafs SOURCE MNT`), shown in /proc/mounts.
    pub source: Option<String>,
    /// Stay in the foreground (`-f`, `-d`).
    pub foreground: bool,
}

/// Mounts and serves. Returns when the filesystem has been unmounted; in background mode the
/// calling (parent) process exits from inside, once the daemon reports.
pub fn run(req: MountRequest) -> Result<(), SetupError> {
    // Everything that can be checked is checked before forking, so errors reach the caller's
    // terminal directly and nothing is mounted.
    let layers = Layers::open(&req.cfg, &req.mountpoint)?;
    let mountpoint =
        std::fs::canonicalize(&req.mountpoint).map_err(|source| SetupError::Mountpoint {
            path: req.mountpoint.clone(),
            source,
        })?;
    let nofile = sys::process::raise_nofile_limit();
    sys::process::tune_malloc();
    let layer_fds = req.cfg.lowerdirs.len() as u64 + 8;
    let fd_budget = (nofile.saturating_sub(layer_fds) / 4).clamp(64, 16384) as usize;

    let status = if req.foreground {
        None
    } else {
        match sys::process::fork_with_status_pipe().map_err(|source| SetupError::Mount {
            path: mountpoint.clone(),
            source,
        })? {
            Forked::Parent(reader) => match reader.wait() {
                ChildStatus::Mounted => std::process::exit(0),
                ChildStatus::Failed(msg) => {
                    eprintln!("stratafs: {msg}");
                    std::process::exit(1);
                }
            },
            Forked::Child(writer) => {
                let _ = sys::process::detach();
                Some(writer)
            }
        }
    };
    match serve(req, layers, &mountpoint, fd_budget, status) {
        Ok(()) => Ok(()),
        Err((err, Some(status))) => {
            status.failed(&err.to_string());
            std::process::exit(1);
        }
        Err((err, None)) => Err(err),
    }
}

/// Starts busy polling of the session's own fd (read by the last of its `threads` readers;
/// the others read cloned fds), unless it is turned off or there is a single CPU, where a
/// polling reader would only take turns with the request's caller.
fn start_busy_poll(
    cfg: &Config,
    session: &fuser::Session<OverlayFs>,
    threads: usize,
) -> Option<Arc<BusyPoll>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg.busy_poll.is_zero() || cpus < 2 {
        return None;
    }
    let readers = Readers {
        poller_name: format!("fuser-{}", threads.saturating_sub(1)),
        count: threads,
    };
    match BusyPoll::start(session.as_fd(), cfg.busy_poll, Some(readers)) {
        Ok(poll) => Some(poll),
        Err(e) => {
            warn!(error = %e, "busy polling unavailable");
            None
        }
    }
}

/// Mounts, reports success through `status`, serves until unmounted.
fn serve(
    req: MountRequest,
    layers: Layers,
    mountpoint: &Path,
    fd_budget: usize,
    status: Option<StatusWriter>,
) -> Result<(), (SetupError, Option<StatusWriter>)> {
    let mount_err = |source: std::io::Error| SetupError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let ovl = match Overlay::new(req.cfg.clone(), layers, fd_budget) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            return Err((
                mount_err(std::io::Error::from_raw_os_error(e.errno())),
                status,
            ));
        }
    };
    let config = fuser_config(&req.cfg, req.source.as_deref());
    // Block the termination signals before any thread exists; one thread waits for them.
    let signals = sys::process::termination_signals();
    if let Err(e) = sys::process::block_signals(&signals) {
        return Err((mount_err(e), status));
    }
    let fs = OverlayFs::new(ovl.clone());
    let busy_poll_slot = fs.busy_poll_slot();
    let mut session = match fuser::Session::new(fs, mountpoint, &config) {
        Ok(s) => s,
        Err(e) => return Err((mount_err(e), status)),
    };
    let busy_poll = if session.io_uring_active() {
        // Requests come through the rings; nothing to poll.
        info!(
            workers_per_cpu = req.cfg.io_uring,
            "serving through FUSE over io_uring"
        );
        None
    } else {
        if req.cfg.io_uring > 0 {
            warn!(
                "io_uring: the kernel does not offer FUSE over io_uring (module parameter \
                 fuse.enable_uring is off, or the kernel is older than 6.14); reading /dev/fuse"
            );
        }
        start_busy_poll(&req.cfg, &session, config.n_threads.unwrap_or(1))
    };
    if let Some(poll) = &busy_poll {
        let _ = busy_poll_slot.set(poll.clone());
    }
    let notifier = session.notifier();
    ovl.set_attr_invalidator(Box::new(move |ino| {
        // A negative offset drops only the cached attributes, not the page cache.
        let _ = notifier.inval_inode(fuser::INodeNo(ino.0), -1, 0);
    }));
    let mut unmounter = session.unmount_callable();
    let mnt_for_log = mountpoint.to_path_buf();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = sys::process::wait_for_signal(&signals) {
                info!(?sig, mountpoint = ?mnt_for_log, "unmounting on signal");
                if let Err(e) = unmounter.unmount() {
                    error!(error = %e, "unmount failed");
                }
            }
        });
    let _ = std::env::set_current_dir("/");
    // Objects are created with exactly the mode the kernel passes (it applied the caller's
    // umask already).
    rustix::process::umask(rustix::fs::Mode::empty());
    info!(mountpoint = ?mountpoint, layers = ovl.cfg.lowerdirs.len(), "mounted");
    if let Some(status) = status {
        status.mounted();
    }
    if let Err(e) = session.run() {
        error!(error = %e, "session ended with an error");
    }
    if let Some(poll) = busy_poll {
        poll.stop();
    }
    info!(nodes = ovl.inodes.len(), "unmounted");
    Ok(())
}

/// Kernel mount options and threading for `cfg`, with fuse-overlayfs's defaults: as root
/// `default_permissions,allow_other,suid,noatime`, otherwise `default_permissions,noatime`.
fn fuser_config(cfg: &Config, source: Option<&str>) -> fuser::Config {
    let root = sys::process::euid() == 0;
    let f = &cfg.fuse;
    let fsname = f
        .fsname
        .clone()
        .or_else(|| source.map(str::to_string))
        .unwrap_or_else(|| "stratafs".to_string());
    let mut opts = vec![
        MountOption::FSName(fsname),
        MountOption::CUSTOM("subtype=stratafs".into()),
        MountOption::DefaultPermissions,
    ];
    if f.suid.unwrap_or(root) {
        opts.push(MountOption::Suid);
    } else {
        opts.push(MountOption::NoSuid);
    }
    opts.push(if f.dev.unwrap_or(false) {
        MountOption::Dev
    } else {
        MountOption::NoDev
    });
    if f.exec == Some(false) {
        opts.push(MountOption::NoExec);
    }
    if !f.atime.unwrap_or(false) {
        opts.push(MountOption::NoAtime);
    }
    if f.sync {
        opts.push(MountOption::Sync);
    }
    if f.dirsync {
        opts.push(MountOption::DirSync);
    }
    opts.push(if cfg.is_read_only() {
        MountOption::RO
    } else {
        MountOption::RW
    });
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    config.acl = if f.allow_other || (root && !f.allow_root) {
        SessionACL::All
    } else if f.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    // More threads than CPUs: a request is answered sooner by a thread already waiting on
    // /dev/fuse than by one still returning from its last reply (measured on 2 CPUs, medians
    // of 3: a warm `ls -lR` of 59k entries 4.0 s with 1 thread, 2.8 s with 2, 2.3 s with 4,
    // 2.2 s with 8; creating and deleting 20k files 6.8, 5.9, 6.0 and 5.6 s).
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    config.n_threads = Some((4 * cpus).clamp(8, 32));
    config.clone_fd = true;
    config.io_uring_workers = cfg.io_uring;
    config
}
