//! The container's filesystem view, built by its pid 1 inside the new mount namespace:
//! private mounts, /proc, a minimal /dev, read-only /sys, the generated /etc files, volumes,
//! then `pivot_root` into the union.
//!
//! Every mount target inside the union is opened fd-relative with `RESOLVE_IN_ROOT`, so a
//! symlink in an image (`/etc/resolv.conf -> /host/...`, `/data -> ../../..`) resolves inside
//! the container's root and can never place a mount on the host.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::mount::{
    MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};

use crate::run::RunError;
use crate::run::rundir::RunDir;
use crate::run::spec::{NetMode, Spec};
use crate::sys::container::mount_set_readonly;

/// What a missing mount target is created as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// The devices bound from the host into the container's /dev (binds work in a user
/// namespace, where mknod does not).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Builds the container's view and pivots into it. Runs in the container's pid 1, in its
/// own mount namespace.
pub fn build(spec: &Spec, dirs: &RunDir) -> Result<(), RunError> {
    let step = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| RunError::Setup(format!("{what}: {e}"))
    };
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(|e| step("making mounts private")(e.into()))?;
    let root = rustix::fs::open(
        &dirs.merged,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| step("opening the container root")(e.into()))?;
    let root = root.as_fd();

    let nodev_nosuid_noexec = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs(root, "proc", "proc", nodev_nosuid_noexec, "").map_err(step("mounting /proc"))?;
    protect_proc(root).map_err(step("protecting /proc"))?;
    build_dev(root).map_err(step("setting up /dev"))?;
    mount_sys(root, spec.net).map_err(step("mounting /sys"))?;
    for name in ["hosts", "hostname", "resolv.conf"] {
        bind(
            root,
            &dirs.etc.join(name),
            &format!("etc/{name}"),
            Kind::File,
            false,
        )
        .map_err(step(&format!("mounting /etc/{name}")))?;
    }
    for v in &spec.volumes {
        let kind = if v.host.is_dir() {
            Kind::Dir
        } else {
            Kind::File
        };
        let rel = v.target.strip_prefix("/").unwrap_or(&v.target);
        bind(root, &v.host, &rel.to_string_lossy(), kind, v.read_only).map_err(step(&format!(
            "mounting volume {} at {}",
            v.host.display(),
            v.target.display()
        )))?;
    }
    if let Some(w) = &spec.workdir {
        let rel = w.strip_prefix("/").unwrap_or(w);
        if !rel.as_os_str().is_empty() {
            open_in_root(root, rel.as_os_str(), Kind::Dir).map_err(step(&format!(
                "creating the working directory {}",
                w.display()
            )))?;
        }
    }
    pivot(&dirs.merged).map_err(step("pivot_root into the union"))?;
    if spec.read_only {
        let new_root = rustix::fs::open("/", OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| step("opening /")(e.into()))?;
        mount_set_readonly(new_root.as_fd(), false).map_err(step("making / read-only"))?;
    }
    Ok(())
}

/// Parts of /proc that reach the host kernel, as runc protects them: read-only (sysctls,
/// sysrq, irq affinity, bus and fs settings; root in the container could otherwise drop the
/// host's caches or change its kernel settings), and hidden behind /dev/null or an empty
/// read-only tmpfs (kernel memory, keys, timers, ACPI, SCSI).
fn protect_proc(root: BorrowedFd<'_>) -> io::Result<()> {
    for rel in [
        "proc/sys",
        "proc/sysrq-trigger",
        "proc/irq",
        "proc/bus",
        "proc/fs",
    ] {
        let Ok(target) = open_existing(root, rel) else {
            continue;
        };
        attach_clone(target.as_fd(), Path::new(""), true, &target)?;
    }
    for rel in [
        "proc/kcore",
        "proc/keys",
        "proc/timer_list",
        "proc/latency_stats",
        "proc/sched_debug",
    ] {
        if open_existing(root, rel).is_ok() {
            bind(root, Path::new("/dev/null"), rel, Kind::File, true)?;
        }
    }
    for rel in ["proc/acpi", "proc/scsi"] {
        if open_existing(root, rel).is_ok() {
            mount_fs(root, rel, "tmpfs", MountFlags::RDONLY, "mode=555")?;
        }
    }
    Ok(())
}

/// Opens `rel` inside `root` if it exists (nothing is created).
fn open_existing(root: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(Into::into)
}

/// `/dev`: a tmpfs with the usual devices bound from the host, a private devpts instance,
/// /dev/shm, /dev/mqueue and the standard symlinks.
fn build_dev(root: BorrowedFd<'_>) -> io::Result<()> {
    mount_fs(
        root,
        "dev",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "mode=755,size=65536k",
    )?;
    for dev in DEVICES {
        bind(
            root,
            &Path::new("/dev").join(dev),
            &format!("dev/{dev}"),
            Kind::File,
            false,
        )?;
    }
    mount_fs(
        root,
        "dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount_fs(
        root,
        "dev/shm",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "mode=1777,size=65536k",
    )?;
    // mqueue needs the IPC namespace to be ours, which it is; a kernel without it is fine.
    let _ = mount_fs(
        root,
        "dev/mqueue",
        "mqueue",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "",
    );
    let dev = open_in_root(root, OsStr::new("dev"), Kind::Dir)?;
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rustix::fs::symlinkat(target, &dev, name)?;
    }
    Ok(())
}

/// A fresh read-only sysfs (possible when the network namespace is ours), else the host's
/// /sys bound read-only with everything below it.
fn mount_sys(root: BorrowedFd<'_>, net: NetMode) -> io::Result<()> {
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    if net == NetMode::None && mount_fs(root, "sys", "sysfs", flags, "").is_ok() {
        return Ok(());
    }
    bind(root, Path::new("/sys"), "sys", Kind::Dir, true)
}

/// Mounts a new `fstype` instance on `rel` inside the root (created as a directory).
fn mount_fs(
    root: BorrowedFd<'_>,
    rel: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let target = open_in_root(root, OsStr::new(rel), Kind::Dir)?;
    let data = std::ffi::CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
    rustix::mount::mount(
        fstype,
        fd_path(&target).as_str(),
        fstype,
        flags,
        Some(data.as_c_str()),
    )
    .map_err(io::Error::from)
}

/// Binds host `src` (with the mounts below it) on `rel` inside the root, read-only when asked,
/// using a detached clone (`open_tree`) so the attributes are set before it becomes visible.
fn bind(
    root: BorrowedFd<'_>,
    src: &Path,
    rel: &str,
    kind: Kind,
    read_only: bool,
) -> io::Result<()> {
    let target = open_in_root(root, OsStr::new(rel), kind)?;
    attach_clone(rustix::fs::CWD, src, read_only, &target)
}

/// Clones the mount tree at `src` (relative to `dir`; the empty path means `dir` itself),
/// read-only when asked, and attaches the clone on `target`: its attributes are set while it
/// is still detached, so nothing ever sees it writable.
fn attach_clone(
    dir: BorrowedFd<'_>,
    src: &Path,
    read_only: bool,
    target: &OwnedFd,
) -> io::Result<()> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_RECURSIVE;
    if src.as_os_str().is_empty() {
        flags |= OpenTreeFlags::AT_EMPTY_PATH;
    }
    let tree = rustix::mount::open_tree(dir, src, flags)?;
    if read_only {
        mount_set_readonly(tree.as_fd(), true)?;
    }
    rustix::mount::move_mount(
        &tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(())
}

/// Opens `rel` inside `root`, resolving symlinks as if `root` were `/` (an absolute target
/// restarts at `root`, `..` stops there), creating what is missing on the way: directories,
/// and the last component as `kind`. A dangling symlink (Debian's `/etc/resolv.conf` in some
/// images) gets its target created, inside the root. Each step opens the path resolved so far
/// with `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`, so a symlink swapped in meanwhile fails the
/// walk instead of leading out.
fn open_in_root(root: BorrowedFd<'_>, rel: &OsStr, kind: Kind) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS;
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let open = |p: &Path, extra: OFlags| {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        rustix::fs::openat2(root, p, flags | extra, Mode::empty(), resolve).map_err(io::Error::from)
    };
    let mut pending: VecDeque<OsString> = components(Path::new(rel)).collect();
    let mut so_far = PathBuf::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            so_far.pop();
            continue;
        }
        let parent = open(&so_far, OFlags::DIRECTORY)?;
        match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = rustix::fs::readlinkat(&parent, &name, Vec::new())?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    so_far.clear();
                }
                for c in components(&target).rev() {
                    pending.push_front(c);
                }
            }
            Ok(_) => so_far.push(&name),
            Err(rustix::io::Errno::NOENT) => {
                if pending.is_empty() && kind == Kind::File {
                    rustix::fs::openat(
                        &parent,
                        &name,
                        OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o644),
                    )?;
                } else {
                    match rustix::fs::mkdirat(&parent, &name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                so_far.push(&name);
            }
            Err(e) => return Err(e.into()),
        }
    }
    open(&so_far, OFlags::empty())
}

/// The normal components of `p`, plus `..` (`.` and the root are dropped).
fn components(p: &Path) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

/// `/proc/self/fd/N`: names an opened object for the path-based mount calls.
fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Makes `new_root` the root: `pivot_root(".", ".")` then detach the old root stacked on it.
fn pivot(new_root: &Path) -> io::Result<()> {
    rustix::process::chdir(new_root)?;
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    rustix::process::chdir("/")?;
    Ok(())
}

/// The mount targets (and their parents) the container's view will create in the union
/// because the image lacks them: /proc, /dev, /sys, the /etc files, volume targets. Checked
/// from the launcher before the container starts.
pub fn missing_mountpoints(merged: &Path, spec: &Spec) -> Vec<PathBuf> {
    let mut targets: Vec<PathBuf> = [
        "proc",
        "dev",
        "sys",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for v in &spec.volumes {
        targets.push(
            v.target
                .strip_prefix("/")
                .unwrap_or(&v.target)
                .to_path_buf(),
        );
    }
    let mut missing = Vec::new();
    for t in targets {
        let mut p = PathBuf::new();
        for c in t.components() {
            p.push(c);
            if std::fs::symlink_metadata(merged.join(&p)).is_err() && !missing.contains(&p) {
                missing.push(p.clone());
            }
        }
    }
    missing
}

/// Removes, through the union and once the container is gone, the empty mount targets it had
/// to create, so they do not end up in the upper layer (and in a commit of it).
pub fn remove_mountpoints(merged: &Path, made: &[PathBuf]) {
    let mut made = made.to_vec();
    made.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for rel in made {
        let p = merged.join(&rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir(&p);
            }
            Ok(m) if m.is_file() && m.len() == 0 => {
                let _ = std::fs::remove_file(&p);
            }
            _ => {}
        }
    }
}
