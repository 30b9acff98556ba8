//! READDIRPLUS per caller (see `src/fuse/readdirplus.rs`): a process that has only listed
//! gets entries without attributes (and then looks each up when it stats one), a process
//! that stats what it lists gets attributes; both see the names, types and inode numbers
//! that `lstat` reports. The daemon's debug log tells which entries were looked up.

use std::fs::File;
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Scratch, bin, can_mount, is_mounted, wait_for};

const FILES: usize = 1200;

/// Lower layer `l2`: directory `a` with files, subdirectories, symlinks and fifos (more than
/// one READDIRPLUS reply holds), some overridden or added by `l1`; directory `b` with files.
fn layers(s: &Scratch) {
    for i in 0..FILES {
        s.write(&format!("l2/a/f-{i:04}"), "lower");
    }
    for i in 0..100 {
        s.write(&format!("l2/a/s-{i:03}/inside"), "x");
    }
    for i in 0..50 {
        std::os::unix::fs::symlink("f-0000", s.path(&format!("l2/a/l-{i:02}"))).unwrap();
        s.write(&format!("l1/a/f-{i:04}"), "upper layer's");
        s.write(&format!("l1/a/x-{i:02}"), "only in l1");
    }
    for i in 0..10 {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            s.path(&format!("l2/a/p-{i}")),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }
    for i in 0..500 {
        s.write(&format!("l2/b/g-{i:04}"), "b");
    }
}

/// Lists `dir` (names, `d_ino`, `d_type`), then checks every entry against `lstat`.
fn list_then_stat(dir: &std::path::Path) -> usize {
    let listed: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), e.ino(), e.file_type().unwrap())
        })
        .collect();
    for (name, ino, kind) in &listed {
        let st = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert_eq!(
            *ino,
            std::os::unix::fs::MetadataExt::ino(&st),
            "{name:?}: d_ino"
        );
        let (a, b) = (kind, st.file_type());
        assert!(
            a.is_dir() == b.is_dir()
                && a.is_file() == b.is_file()
                && a.is_symlink() == b.is_symlink()
                && a.is_fifo() == b.is_fifo(),
            "{name:?}: d_type {a:?} but lstat {b:?}"
        );
    }
    listed.len()
}

#[test]
fn listing_callers_get_bare_entries_and_stat_callers_attributes() {
    if !can_mount("listing_callers_get_bare_entries_and_stat_callers_attributes") {
        return;
    }
    let s = Scratch::new();
    layers(&s);
    let m = s.mnt();
    let log = s.path("daemon.log");
    let mut daemon = Command::new(bin())
        .args(["-f", "-o", &s.opts(true), m.to_str().unwrap()])
        .env("RUST_LOG", "stratafs::fuse=debug")
        .stderr(Stdio::from(File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || is_mounted(&m)),
        "not mounted"
    );

    // This thread has listed nothing yet: `a` comes without attributes, but for its
    // subdirectories; stat-ing its entries then looks them up, which marks us a caller that
    // stats, so `b` comes with attributes.
    assert_eq!(list_then_stat(&m.join("a")), FILES + 100 + 50 + 50 + 10);
    assert_eq!(list_then_stat(&m.join("b")), 500);
    // A caller that stats: the lookups above also gave the kernel every entry of `a`.
    assert_eq!(list_then_stat(&m.join("a")), FILES + 210);

    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.wait().unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let lookups = |prefix: &str| {
        log.lines()
            .filter(|l| l.contains("op=\"lookup\"") && l.contains(&format!("name=\"{prefix}")))
            .count()
    };
    assert_eq!(
        lookups("f-"),
        FILES,
        "files of `a`, listed bare, then looked up once"
    );
    assert_eq!(lookups("l-") + lookups("x-") + lookups("p-"), 110);
    assert_eq!(lookups("s-"), 0, "subdirectories came with attributes");
    assert_eq!(lookups("g-"), 0, "`b` came with attributes");
}
