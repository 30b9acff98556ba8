//! The daemon never follows a symlink out of a layer.

use std::os::unix::fs::symlink;

use crate::support::{Scratch, can_mount};

#[test]
fn symlinks_in_layers_never_lead_the_daemon_outside() {
    if !can_mount("symlinks_in_layers_never_lead_the_daemon_outside") {
        return;
    }
    let s = Scratch::new();
    // Host-escaping symlinks in a lower layer are shown as symlinks, never resolved by us.
    symlink("/etc", s.path("l1/etc")).unwrap();
    symlink("../../../../../../../..", s.path("l1/x")).unwrap();
    // A directory in the top layer over a symlink to /etc below: the merged directory must not
    // pick up the host's /etc through the lower "copy".
    std::fs::create_dir(s.path("l1/d")).unwrap();
    std::fs::write(s.path("l1/d/own"), "own").unwrap();
    symlink("/etc", s.path("l2/d")).unwrap();
    s.mount(false);
    let m = s.mnt();
    assert_eq!(
        std::fs::read_link(m.join("etc")).unwrap().to_str(),
        Some("/etc")
    );
    assert!(
        std::fs::symlink_metadata(m.join("x"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let names: Vec<_> = std::fs::read_dir(m.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["own"]);
    assert!(std::fs::metadata(m.join("d/passwd")).is_err());
}

#[test]
fn lower_directory_swapped_for_a_symlink_while_mounted() {
    if !can_mount("lower_directory_swapped_for_a_symlink_while_mounted") {
        return;
    }
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("l1/d")).unwrap();
    std::fs::create_dir_all(s.path("l2/d/sub")).unwrap();
    std::fs::write(s.path("l2/d/sub/f"), "lower").unwrap();
    s.mount(false);
    let m = s.mnt();
    // Changing layers under a mount is undefined behaviour (overlayfs.rst) but must never make
    // the daemon read host files: swap the lower directory for a symlink to /etc and look up
    // names that exist in /etc.
    std::fs::rename(s.path("l2/d"), s.path("l2/d.old")).unwrap();
    symlink("/etc", s.path("l2/d")).unwrap();
    for name in ["passwd", "hostname", "os-release"] {
        let p = m.join("d").join(name);
        if let Ok(content) = std::fs::read(&p) {
            let host = std::fs::read(std::path::Path::new("/etc").join(name)).unwrap_or_default();
            assert_ne!(content, host, "host file {name} leaked through the union");
        }
    }
}
