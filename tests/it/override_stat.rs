//! `xattr_permissions=1|2`: owners and modes kept in an override attribute instead of the
//! inode (fuse-overlayfs's `override_stat`), through a real mount, as root and in a user
//! namespace.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::support::{Scratch, can_mount};

const CONTAINERS: &str = "user.containers.override_stat";

/// (uid, gid, permission bits) as `stat` shows them.
fn shown(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn xattr(p: &Path, name: &str) -> Option<String> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(p)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

#[test]
fn chown_and_chmod_go_to_the_attribute_and_survive_a_remount() {
    if !can_mount("chown_and_chmod_go_to_the_attribute_and_survive_a_remount") {
        return;
    }
    let s = Scratch::new();
    s.write("l1/f", "lower");
    s.mount_with(true, ",xattr_permissions=2");
    let m = s.mnt();
    std::fs::write(m.join("new"), "x").unwrap();
    chown(&m.join("new"), 1234, 5678);
    std::fs::set_permissions(m.join("new"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    assert_eq!(shown(&m.join("new")), (1234, 5678, 0o4750));
    // The inode keeps the daemon's owner and the created mode; the attribute has the rest.
    assert_eq!(shown(&s.path("u/new")), (0, 0, 0o644));
    assert_eq!(
        xattr(&s.path("u/new"), CONTAINERS).as_deref(),
        Some("1234:5678:4750")
    );
    // A chown clears set-user-id, as a real one does.
    chown(&m.join("new"), 1, 2);
    assert_eq!(shown(&m.join("new")), (1, 2, 0o750));
    // A lower file: copied up, owner recorded.
    chown(&m.join("f"), 42, 43);
    assert_eq!(shown(&m.join("f")), (42, 43, 0o644));
    assert_eq!(shown(&s.path("u/f")).0, 0);
    // Directories too; the attribute is not in the merged view.
    std::fs::create_dir(m.join("d")).unwrap();
    std::fs::set_permissions(m.join("d"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(shown(&m.join("d")).2, 0o1777);
    assert_eq!(xattr(&m.join("new"), CONTAINERS), None);
    let listed = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(m.join("new"))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("override_stat"));
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(&m)
        .output()
        .unwrap();
    assert!(out.status.success());
    s.mount_with(true, ",xattr_permissions=2");
    assert_eq!(shown(&m.join("new")), (1, 2, 0o750));
    assert_eq!(shown(&m.join("f")), (42, 43, 0o644));
}

#[test]
fn a_lower_layer_marked_at_its_root_shows_its_overrides() {
    if !can_mount("a_lower_layer_marked_at_its_root_shows_its_overrides") {
        return;
    }
    let s = Scratch::new();
    s.write("l2/bin/tool", "#!/bin/sh\n");
    s.write("l2/plain", "p");
    let set = |p: &Path, v: &str| {
        let ok = Command::new("setfattr")
            .args(["-n", CONTAINERS, "-v", v])
            .arg(p)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    // containers-storage marks the layer root, then each file whose mode it masked.
    set(&s.path("l2"), "0:0:755");
    set(&s.path("l2/bin/tool"), "0:0:4755");
    set(&s.path("l2/bin"), "7:8:700");
    s.mount(true);
    let m = s.mnt();
    assert_eq!(shown(&m.join("bin/tool")), (0, 0, 0o4755));
    assert_eq!(shown(&m.join("bin")), (7, 8, 0o700));
    assert_eq!(
        shown(&m.join("plain")),
        (0, 0, 0o644),
        "no attribute: the inode's"
    );
    // Without xattr_permissions= the upper layer stores real owners: a copy-up keeps the
    // lower's attribute, so the file still shows the same.
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("bin/tool"))
        .unwrap();
    std::fs::write(m.join("bin/tool"), "#!/bin/sh\necho\n").unwrap();
    assert!(s.path("u/bin/tool").exists());
    assert_eq!(
        xattr(&s.path("u/bin/tool"), CONTAINERS).as_deref(),
        Some("0:0:4755")
    );
}

#[test]
fn rootless_modes_are_kept_in_the_attribute() {
    if !can_mount("rootless_modes_are_kept_in_the_attribute") {
        return;
    }
    let s = Scratch::new();
    s.write("l1/f", "lower");
    let script = format!(
        "{bin} -o {opts},xattr_permissions=2 {m} && touch {m}/new && chmod 2741 {m}/new && \
         stat -c %a {m}/new && chmod 600 {m}/f && stat -c %a {m}/f && fusermount3 -u {m}",
        bin = crate::support::bin().display(),
        opts = s.opts(true),
        m = s.mnt().display()
    );
    let out = Command::new("unshare")
        .args(["-Urm", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2741\n600\n");
    assert_eq!(shown(&s.path("u/new")).2, 0o644, "the inode keeps its mode");
    assert_eq!(
        xattr(&s.path("u/new"), CONTAINERS).as_deref(),
        Some("0:0:2741")
    );
    assert_eq!(
        xattr(&s.path("u/f"), CONTAINERS).as_deref(),
        Some("0:0:600")
    );
}

#[test]
fn bad_values_are_refused() {
    for bad in [
        "xattr_permissions=3",
        "xattr_permissions=x",
        "xattr_permissions",
    ] {
        let out = crate::support::run(["-o", &format!("lowerdir=/tmp,{bad}"), "/tmp"]);
        assert!(!out.status.success(), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("xattr_permissions"),
            "{bad}"
        );
    }
}
