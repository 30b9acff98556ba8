//! The container's FUSE daemon: this same program in mount mode, run as a child of the
//! launcher in the launcher's mount namespace, so it serves from outside the container's
//! mount namespace and view, and dies with the launcher (parent-death signal).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::run::RunError;
use crate::sys::container::spawn_tied_to_parent;

/// `f_type` of a FUSE filesystem (linux/magic.h `FUSE_SUPER_MAGIC`).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// A running daemon serving one union.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    mountpoint: PathBuf,
}

impl Daemon {
    /// Mounts `lowers` (top first) under `upper` on `mountpoint` and waits until the mount is
    /// live. `extra` adds mount options (`,ro`).
    pub fn start(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        mountpoint: &Path,
        extra: &str,
    ) -> Result<Daemon, RunError> {
        // allow_other: the container's processes may run as other users than the daemon.
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},allow_other{extra}",
            crate::ovl::params::lowerdir_value(lowers),
            upper.display(),
            work.display()
        );
        let exe = std::env::current_exe()
            .map_err(|e| RunError::Setup(format!("finding the stratafs binary: {e}")))?;
        let mut cmd = Command::new(exe);
        cmd.arg("-f")
            .arg("-o")
            .arg(opts)
            .arg(mountpoint)
            .stdin(Stdio::null());
        let child = spawn_tied_to_parent(&mut cmd)
            .map_err(|e| RunError::Setup(format!("starting the FUSE daemon: {e}")))?;
        let mut daemon = Daemon {
            child,
            mountpoint: mountpoint.to_path_buf(),
        };
        daemon.wait_mounted()?;
        Ok(daemon)
    }

    /// Polls until `mountpoint` is a FUSE mount, the daemon exits, or 20 s pass.
    fn wait_mounted(&mut self) -> Result<(), RunError> {
        let start = Instant::now();
        // Polled every 250 µs: the daemon takes a few milliseconds to mount, and every
        // millisecond here is container start-up time.
        let pause = Duration::from_micros(250);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(RunError::Setup(format!(
                    "the FUSE daemon exited before mounting the layers ({status})"
                )));
            }
            if rustix::fs::statfs(&self.mountpoint).is_ok_and(|s| s.f_type == FUSE_SUPER_MAGIC) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                return Err(RunError::Setup(
                    "the FUSE daemon did not mount within 20 s".into(),
                ));
            }
            std::thread::sleep(pause);
        }
    }

    /// Unmounts (the daemon then exits) and reaps the daemon; kills it if it lingers.
    pub fn stop(mut self) {
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_micros(250));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
