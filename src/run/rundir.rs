//! A container's run directory: `ROOT/run/ID/` holds the temporary upper and work
//! directories, the mountpoint of the union and the generated /etc files.
//!
//! `ROOT/run/ID.lock` is created first and held locked (`flock`) for the container's life, so a
//! later run can tell a directory whose launcher died (SIGKILL, power loss) from a live one
//! and remove it: [`sweep`]. Kept uppers (`--keep`) move to `ROOT/kept/ID/upper`.

use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::run::RunError;
use crate::run::spec::Spec;

/// The directories of one container.
#[derive(Debug)]
pub struct RunDir {
    /// `ROOT/run/ID`.
    pub path: PathBuf,
    /// The upper layer (temporary or `--upper`).
    pub upper: PathBuf,
    /// Its workdir.
    pub work: PathBuf,
    /// Where the union is mounted.
    pub merged: PathBuf,
    /// Generated `hosts`, `hostname`, `resolv.conf`.
    pub etc: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    temporary_upper: bool,
}

impl RunDir {
    /// Creates the run directory of `spec` (and `--upper` with its workdir) under a held lock.
    pub fn create(spec: &Spec) -> Result<RunDir, RunError> {
        let err = |what: &Path, e: io::Error| RunError::Setup(format!("{}: {e}", what.display()));
        let runs = spec.root.join("run");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runs)
            .map_err(|e| err(&runs, e))?;
        let lock_path = runs.join(format!("{}.lock", spec.id));
        let lock = File::create(&lock_path).map_err(|e| err(&lock_path, e))?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| err(&lock_path, e.into()))?;
        let path = runs.join(&spec.id);
        let (upper, work) = match &spec.upper {
            Some(u) => {
                let name = u
                    .file_name()
                    .map_or("upper".into(), |n| n.to_string_lossy());
                let work = u
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .join(format!(".{name}.work"));
                (u.clone(), work)
            }
            None => (path.join("upper"), path.join("work")),
        };
        for d in [
            &path,
            &upper,
            &work,
            &path.join("merged"),
            &path.join("etc"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(d)
                .map_err(|e| err(d, e))?;
        }
        // The daemon gets these in -o, where a comma would split the option.
        let upper = std::fs::canonicalize(&upper).map_err(|e| err(&upper, e))?;
        let work = std::fs::canonicalize(&work).map_err(|e| err(&work, e))?;
        for p in [&upper, &work] {
            if p.to_string_lossy().contains(',') {
                return Err(RunError::Invalid(format!(
                    "{} contains a comma, which the mount options cannot carry",
                    p.display()
                )));
            }
        }
        Ok(RunDir {
            merged: path.join("merged"),
            etc: path.join("etc"),
            path,
            upper,
            work,
            lock_path,
            _lock: lock,
            temporary_upper: spec.upper.is_none(),
        })
    }

    /// Writes `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` for the container.
    pub fn write_etc(&self, hostname: &str, host_net: bool) -> Result<(), RunError> {
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
        );
        // With a private network there is no resolver to reach; keep the host's file anyway so
        // that programs that only parse it behave the same.
        let _ = host_net;
        let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        for (name, content) in [
            ("hosts", hosts.into_bytes()),
            ("hostname", format!("{hostname}\n").into_bytes()),
            ("resolv.conf", resolv),
        ] {
            let p = self.etc.join(name);
            std::fs::write(&p, content)
                .map_err(|e| RunError::Setup(format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }

    /// Removes the run directory; with `keep`, moves a temporary upper to `ROOT/kept/ID/upper`
    /// first and returns that path.
    pub fn finish(self, root: &Path, id: &str, keep: bool) -> Result<Option<PathBuf>, RunError> {
        let mut kept = None;
        if keep && self.temporary_upper {
            let dest = root.join("kept").join(id);
            std::fs::create_dir_all(&dest)
                .and_then(|()| std::fs::rename(&self.upper, dest.join("upper")))
                .map_err(|e| RunError::Setup(format!("keeping {}: {e}", self.upper.display())))?;
            kept = Some(dest.join("upper"));
        }
        crate::sys::fs::remove_host_tree(&self.path)
            .map_err(|e| RunError::Setup(format!("removing {}: {e}", self.path.display())))?;
        let _ = std::fs::remove_file(&self.lock_path);
        Ok(kept)
    }
}

/// Removes the run directories of containers whose launcher is gone (their lock is free).
/// Returns how many were removed.
pub fn sweep(root: &Path, own_id: &str) -> usize {
    let runs = root.join("run");
    let Ok(entries) = std::fs::read_dir(&runs) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(id) = name.strip_suffix(".lock") else {
            // A directory without its lock file is an orphan: the lock is created before the
            // directory and removed after it.
            if name != own_id && !runs.join(format!("{name}.lock")).exists() {
                removed += usize::from(crate::sys::fs::remove_host_tree(&entry.path()).is_ok());
            }
            continue;
        };
        if id == own_id {
            continue;
        }
        let Ok(lock) = File::open(entry.path()) else {
            continue;
        };
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok() {
            let dir = runs.join(id);
            if crate::sys::fs::remove_host_tree(&dir).is_ok() || !dir.exists() {
                let _ = std::fs::remove_file(entry.path());
                removed += 1;
            }
        }
    }
    removed
}
