//! Lookups after a listing skip the lower layers that do not hold the name, using the names
//! the listing read (see `src/ovl/names.rs`). What a lookup finds must not change: the top
//! layer's entry, whiteouts of either encoding in between, and the upper layer as it changes.

use std::io::ErrorKind;
use std::path::Path;

use crate::support::{Scratch, can_mount, run};

/// Four lower layers `l1` (top) to `l4` under `d`; returns the mounted scratch tree.
fn mounted(extra: &str) -> Scratch {
    let s = Scratch::new();
    for l in ["l3", "l4"] {
        std::fs::create_dir(s.path(l)).unwrap();
    }
    std::fs::create_dir_all(s.path("l1/d")).unwrap();
    for n in ["a", "b", "c", "hidden", "hidden2", "deep/f"] {
        s.write(&format!("l4/d/{n}"), "l4");
    }
    // l3 hides two names, one with a `.wh.` file and one with a character-device whiteout.
    s.write("l3/d/.wh.hidden", "");
    let wh = s.path("l3/d/hidden2");
    let made = std::process::Command::new("mknod")
        .arg(&wh)
        .args(["c", "0", "0"])
        .status()
        .unwrap();
    assert!(made.success(), "mknod of a whiteout");
    s.write("l2/d/b", "l2");
    s.write("l2/d/x", "l2");
    let lowers: Vec<String> = ["l1", "l2", "l3", "l4"]
        .iter()
        .map(|l| s.path(l).display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}{extra}",
        lowers.join(":"),
        s.path("u").display(),
        s.path("w").display()
    );
    let out = run(["-o", &opts, s.mnt().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn listed(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn missing(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == ErrorKind::NotFound)
}

fn lookups_after_a_listing(extra: &str) {
    let s = mounted(extra);
    let d = s.mnt().join("d");
    assert_eq!(listed(&d), ["a", "b", "c", "deep", "x"], "{extra}");
    for (name, content) in [
        ("a", "l4"),
        ("b", "l2"),
        ("c", "l4"),
        ("x", "l2"),
        ("deep/f", "l4"),
    ] {
        assert_eq!(
            std::fs::read_to_string(d.join(name)).unwrap(),
            content,
            "{name} {extra}"
        );
    }
    for name in ["hidden", "hidden2", "nope", ".wh.hidden"] {
        assert!(missing(&d.join(name)), "{name} shows ({extra})");
    }
    // The upper layer changes under the remembered lower names.
    std::fs::write(d.join("nope"), "new").unwrap();
    std::fs::write(d.join("hidden"), "new").unwrap();
    std::fs::remove_file(d.join("a")).unwrap();
    assert!(missing(&d.join("a")), "{extra}");
    assert_eq!(
        listed(&d),
        ["b", "c", "deep", "hidden", "nope", "x"],
        "{extra}"
    );
    std::fs::write(d.join("a"), "again").unwrap();
    for (name, content) in [
        ("a", "again"),
        ("nope", "new"),
        ("hidden", "new"),
        ("b", "l2"),
    ] {
        assert_eq!(
            std::fs::read_to_string(d.join(name)).unwrap(),
            content,
            "{name} {extra}"
        );
    }
    assert!(missing(&d.join("hidden2")), "{extra}");
}

#[test]
fn lookups_after_a_listing_find_what_the_layers_hold() {
    if !can_mount("lookups_after_a_listing_find_what_the_layers_hold") {
        return;
    }
    lookups_after_a_listing("");
    lookups_after_a_listing(",timeout=0");
}
