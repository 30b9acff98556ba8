//! Owner translation (`uidmapping=`, `gidmapping=`, `squash_to_*`) through a real mount, with
//! fuse-overlayfs's semantics: `A:B:N` shows disk ids `A..A+N` as `B..B+N`, shown ids are
//! stored mapped back, and ids outside every range become the overflow id.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::support::{Scratch, can_mount};

fn owner(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// `l2` holds `root` (0:0), `five` (5:6), `far` (50000:50000) in a world-writable `d`.
fn layers() -> Scratch {
    let s = Scratch::new();
    for (name, ids) in [("root", (0, 0)), ("five", (5, 6)), ("far", (50000, 50000))] {
        s.write(&format!("l2/d/{name}"), name);
        chown(&s.path(&format!("l2/d/{name}")), ids.0, ids.1);
    }
    std::fs::set_permissions(s.path("l2/d"), std::fs::Permissions::from_mode(0o777)).unwrap();
    s
}

#[test]
fn mapped_owners_show_mapped_and_are_stored_mapped_back() {
    if !can_mount("mapped_owners_show_mapped_and_are_stored_mapped_back") {
        return;
    }
    let s = layers();
    s.mount_with(true, ",uidmapping=0:1000:100,gidmapping=0:2000:100");
    let d = s.mnt().join("d");
    assert_eq!(owner(&d.join("root")), (1000, 2000));
    assert_eq!(owner(&d.join("five")), (1005, 2006));
    assert_eq!(
        owner(&d.join("far")),
        (65534, 65534),
        "unmapped ids show as overflow"
    );
    // chown takes shown ids and stores them mapped back.
    chown(&d.join("root"), 1007, 2008);
    assert_eq!(owner(&d.join("root")), (1007, 2008));
    assert_eq!(owner(&s.path("u/d/root")), (7, 8));
    // A new object belongs to its creator, as the layers store that id.
    let made = Command::new("setpriv")
        .args(["--reuid=1003", "--regid=2004", "--clear-groups", "touch"])
        .arg(d.join("new"))
        .status()
        .unwrap();
    assert!(made.success(), "touch as 1003:2004");
    assert_eq!(owner(&d.join("new")), (1003, 2004));
    assert_eq!(owner(&s.path("u/d/new")), (3, 4));
    std::fs::create_dir(d.join("sub")).unwrap();
    assert_eq!(
        owner(&s.path("u/d/sub")),
        (65534, 65534),
        "root (unmapped) creates as overflow"
    );
    // The default permission checks use the shown owner: 1003 owns `new`, not `five`.
    let denied = Command::new("setpriv")
        .args([
            "--reuid=1003",
            "--regid=2004",
            "--clear-groups",
            "chmod",
            "600",
        ])
        .arg(d.join("five"))
        .status()
        .unwrap();
    assert!(!denied.success(), "chmod of another user's file");
}

#[test]
fn squashed_owners_show_one_owner_and_chown_never_fails() {
    if !can_mount("squashed_owners_show_one_owner_and_chown_never_fails") {
        return;
    }
    let s = layers();
    s.mount_with(true, ",squash_to_uid=1234,squash_to_gid=4321");
    let d = s.mnt().join("d");
    for name in ["root", "five", "far"] {
        assert_eq!(owner(&d.join(name)), (1234, 4321), "{name}");
    }
    chown(&d.join("five"), 7, 7);
    assert_eq!(owner(&d.join("five")), (1234, 4321));
    drop(s);
    // squash_to_root shows 0:0; an explicit squash_to_gid wins over it for groups.
    let s = layers();
    s.mount_with(true, ",squash_to_root,squash_to_gid=9");
    assert_eq!(owner(&s.mnt().join("d/far")), (0, 9));
}

/// A detached clone of a directory made idmapped (disk ids `0..65536` show as
/// `100000..165536`, as containers-storage makes them for `--uidmap 0:100000:65536`) and
/// mounted at `at`; lazily unmounted on drop.
struct IdmappedMount(std::path::PathBuf);

/// The user namespace `--uidmap 0:100000:65536` would give a container, as an fd: a child
/// `unshare -U` whose maps we write (as root), kept only until its namespace is open.
fn shifted_userns() -> Option<std::fs::File> {
    let mut child = Command::new("unshare")
        .args(["-U", "sleep", "30"])
        .spawn()
        .ok()?;
    let ns = format!("/proc/{}/ns/user", child.id());
    let ours = std::fs::read_link("/proc/self/ns/user").ok()?;
    let entered = crate::support::wait_for(std::time::Duration::from_secs(5), || {
        std::fs::read_link(&ns).is_ok_and(|n| n != ours)
    });
    let maps = ["uid_map", "gid_map"]
        .iter()
        .all(|m| std::fs::write(format!("/proc/{}/{m}", child.id()), "0 100000 65536\n").is_ok());
    let fd = if entered && maps {
        std::fs::File::open(&ns).ok()
    } else {
        None
    };
    let _ = child.kill();
    let _ = child.wait();
    fd
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

impl IdmappedMount {
    /// `None` (the caller skips) where the kernel or the filesystem does not allow it.
    fn new(src: &Path, at: &Path) -> Option<IdmappedMount> {
        use rustix::mount::{MoveMountFlags, OpenTreeFlags};
        use std::os::fd::AsRawFd;
        let userns = shifted_userns()?;
        let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
        let tree = rustix::mount::open_tree(rustix::fs::CWD, src, flags).ok()?;
        let attr = MountAttr {
            attr_set: 0x0010_0000, // MOUNT_ATTR_IDMAP
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        // SAFETY: a valid fd, a NUL-terminated empty path and a live mount_attr of the size
        // given; the kernel only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            eprintln!(
                "mount_setattr(MOUNT_ATTR_IDMAP): {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        std::fs::create_dir_all(at).ok()?;
        let moved = rustix::mount::move_mount(
            &tree,
            "",
            rustix::fs::CWD,
            at,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        );
        moved.ok().map(|()| IdmappedMount(at.to_path_buf()))
    }
}

impl Drop for IdmappedMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// podman 4.3 with `--uidmap` hands over lowers on idmapped mounts already shifted to the
/// container's ids *and* `uidmapping=` for the same shift: owners must be shifted once.
#[test]
fn idmapped_lower_is_shifted_once() {
    let test = "idmapped_lower_is_shifted_once";
    if !can_mount(test) {
        return;
    }
    let s = layers();
    let Some(_mapped) = IdmappedMount::new(&s.path("l2"), &s.path("mapped")) else {
        eprintln!("SKIP {test}: cannot make an idmapped mount here");
        return;
    };
    assert_eq!(
        owner(&s.path("mapped/d/five")),
        (100005, 100006),
        "the mount shifts"
    );
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={},uidmapping=0:100000:65536,gidmapping=0:100000:65536",
        s.path("l1").display(),
        s.path("mapped").display(),
        s.path("u").display(),
        s.path("w").display(),
    );
    let out = crate::support::run(["-o", &opts, s.mnt().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = s.mnt().join("d");
    assert_eq!(owner(&d.join("root")), (100000, 100000));
    assert_eq!(owner(&d.join("five")), (100005, 100006));
    // A copy-up keeps the disk ids: the upper stores what the layer holds.
    chown(&d.join("five"), 100007, 100008);
    assert_eq!(owner(&s.path("u/d/five")), (7, 8));
    assert_eq!(
        owner(&s.path("u/d")),
        (0, 0),
        "copied-up parent keeps disk owner"
    );
}
