//! Shared helpers: temp layer trees, running the binary, mounting and unmounting.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Path of the freshly built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stratafs"))
}

/// Runs `stratafs` with `args`.
pub fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin())
        .args(args)
        .output()
        .expect("run stratafs")
}

/// Whether real FUSE mounts can be made here; prints the reason when not.
pub fn can_mount(test: &str) -> bool {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("SKIP {test}: needs root for FUSE mounts");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP {test}: /dev/fuse is missing");
        return false;
    }
    true
}

/// Whether `path` is a mountpoint right now.
pub fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = canon.to_string_lossy().into_owned();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// Waits until `cond` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A scratch tree with lower layers, an upper, a workdir and a mountpoint; unmounts and
/// removes itself on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("stratafs-it-")
            .tempdir()
            .expect("tempdir");
        for d in ["l1", "l2", "u", "w", "m"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Scratch { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn mnt(&self) -> PathBuf {
        self.path("m")
    }

    /// `lowerdir=l1:l2` (plus upper/work when `rw`) as one -o value.
    pub fn opts(&self, rw: bool) -> String {
        let mut o = format!(
            "lowerdir={}:{}",
            self.path("l1").display(),
            self.path("l2").display()
        );
        if rw {
            o += &format!(
                ",upperdir={},workdir={}",
                self.path("u").display(),
                self.path("w").display()
            );
        }
        o
    }

    /// Mounts in the background the way podman does, asserting success.
    pub fn mount(&self, rw: bool) {
        self.mount_with(rw, "");
    }

    /// [`Scratch::mount`] with more `-o` options (`extra` starts with a comma).
    pub fn mount_with(&self, rw: bool, extra: &str) {
        let opts = self.opts(rw) + extra;
        let out = run(["-o", &opts, self.mnt().to_str().unwrap()]);
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(is_mounted(&self.mnt()), "exit 0 but not mounted");
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let m = self.mnt();
        if is_mounted(&m) {
            let _ = Command::new("fusermount3").arg("-u").arg(&m).output();
            if is_mounted(&m) {
                let _ = Command::new("umount").arg("-l").arg(&m).output();
            }
        }
    }
}
