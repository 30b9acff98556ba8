//! `--memory`, `--cpus`, `--pids-limit`: a cgroup v2 child of the launcher's own cgroup,
//! when the unified hierarchy is mounted, writable, and delegates the needed controllers.
//! Otherwise a clear error naming what is missing, before anything is started.

use std::path::{Path, PathBuf};

use crate::run::RunError;
use crate::run::spec::Limits;

/// A created cgroup, removed on drop (once empty).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// The unified (v2) hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts.
fn unified_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}

/// The launcher's cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

impl Cgroup {
    /// Creates `stratafs-ID` next to the launcher's cgroup (a cgroup with processes cannot
    /// have controller-enabled children, so the sibling is used) and writes the limits.
    pub fn create(limits: &Limits, id: &str) -> Result<Cgroup, RunError> {
        let missing = |what: String| RunError::Invalid(format!("resource limits need {what}"));
        let mount = unified_mount()
            .ok_or_else(|| missing("a cgroup v2 (unified) hierarchy; none is mounted".into()))?;
        let own =
            own_cgroup().ok_or_else(|| missing("a cgroup v2 entry in /proc/self/cgroup".into()))?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        let parent = own_dir
            .parent()
            .filter(|p| p.starts_with(&mount))
            .unwrap_or(&mount)
            .to_path_buf();
        let available =
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
        for (wanted, controller) in [
            (limits.memory.is_some(), "memory"),
            (limits.cpu_max.is_some(), "cpu"),
            (limits.pids.is_some(), "pids"),
        ] {
            if wanted && !available.split_whitespace().any(|c| c == controller) {
                return Err(missing(format!(
                    "the {controller} controller enabled in {} (cgroup.subtree_control has {:?})",
                    parent.display(),
                    available.trim()
                )));
            }
        }
        let path = parent.join(format!("stratafs-{id}"));
        std::fs::create_dir(&path).map_err(|e| {
            missing(format!(
                "a writable cgroup: creating {} failed: {e}",
                path.display()
            ))
        })?;
        let cg = Cgroup { path };
        let set = |file: &str, value: String| {
            std::fs::write(cg.path.join(file), &value).map_err(|e| {
                RunError::Setup(format!(
                    "writing {value:?} to {}: {e}",
                    cg.path.join(file).display()
                ))
            })
        };
        if let Some(m) = limits.memory {
            set("memory.max", m.to_string())?;
        }
        if let Some(c) = &limits.cpu_max {
            set("cpu.max", c.clone())?;
        }
        if let Some(p) = limits.pids {
            set("pids.max", p.to_string())?;
        }
        Ok(cg)
    }

    /// Moves process `pid` (and the children it will have) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), RunError> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).map_err(|e| {
            RunError::Setup(format!(
                "moving the container into {}: {e}",
                self.path.display()
            ))
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
