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
