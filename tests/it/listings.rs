//! Directory listings without OPENDIR: the kernel opens directories without asking us and
//! names a listing only by the offsets we gave out (see `src/ovl/readdir.rs`). Streams that
//! interleave, outnumber the listings kept, or read on while the directory changes must still
//! see every unchanged entry exactly once, as with kernel overlayfs's per-open listing.

use std::collections::HashMap;
use std::fs::ReadDir;

use crate::support::{Scratch, can_mount};

const FILES: usize = 3000;

fn name(i: usize) -> String {
    // Long names: a 4 KiB READDIR reply holds few, so a walk takes many reads at offsets.
    format!("entry-{i:04}-with-a-long-name-so-that-replies-hold-few-entries")
}

/// Layers with `FILES` lower files in `d`, mounted read-write with `extra` options (",a=b").
fn mounted(extra: &str) -> Scratch {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("l2/d")).unwrap();
    for i in 0..FILES {
        std::fs::write(s.path("l2/d").join(name(i)), "x").unwrap();
    }
    s.mount_with(true, extra);
    s
}

fn take(it: &mut ReadDir, n: usize) -> Vec<String> {
    it.take(n)
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// How often each name was returned.
fn counts(names: Vec<String>) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for n in names {
        *c.entry(n).or_insert(0) += 1;
    }
    c
}

fn streams_reading_while_the_directory_changes(extra: &str) {
    let s = mounted(extra);
    let d = s.mnt().join("d");
    let mut first = std::fs::read_dir(&d).unwrap();
    let mut seen_first = take(&mut first, 1000);
    let mut second = std::fs::read_dir(&d).unwrap();
    let mut seen_second = take(&mut second, 10);
    for i in 2500..2700 {
        std::fs::remove_file(d.join(name(i))).unwrap();
    }
    for i in 0..100 {
        std::fs::write(d.join(format!("new-{i}")), "n").unwrap();
    }
    seen_first.extend(take(&mut first, usize::MAX));
    seen_second.extend(take(&mut second, usize::MAX));
    for (which, seen) in [("first", seen_first), ("second", seen_second)] {
        let c = counts(seen);
        for (n, k) in &c {
            assert_eq!(*k, 1, "{which} stream returned {n} {k} times ({extra})");
        }
        for i in (0..2500).chain(2700..FILES) {
            assert!(
                c.contains_key(&name(i)),
                "{which} stream missed {} ({extra})",
                name(i)
            );
        }
    }
    // A new stream shows the directory as it is now.
    let now = counts(take(&mut std::fs::read_dir(&d).unwrap(), usize::MAX));
    assert_eq!(now.len(), FILES - 200 + 100, "{extra}");
    assert!(now.values().all(|&k| k == 1));
    assert!(!now.contains_key(&name(2600)) && now.contains_key("new-99"));
}

#[test]
fn interleaved_streams_see_unchanged_entries_once_while_the_dir_changes() {
    if !can_mount("interleaved_streams_see_unchanged_entries_once_while_the_dir_changes") {
        return;
    }
    streams_reading_while_the_directory_changes("");
    // timeout=0 keeps OPENDIR (listings must not be cached by the kernel): same guarantees.
    streams_reading_while_the_directory_changes(",timeout=0");
}

#[test]
fn more_open_streams_than_listings_kept() {
    if !can_mount("more_open_streams_than_listings_kept") {
        return;
    }
    for extra in ["", ",timeout=0"] {
        let s = mounted(extra);
        let d = s.mnt().join("d");
        let mut streams: Vec<_> = (0..100).map(|_| std::fs::read_dir(&d).unwrap()).collect();
        let mut seen: Vec<Vec<String>> = streams.iter_mut().map(|it| take(it, 5)).collect();
        for (it, names) in streams.iter_mut().zip(seen.iter_mut()) {
            names.extend(take(it, usize::MAX));
        }
        for names in seen {
            let c = counts(names);
            assert_eq!(c.len(), FILES, "{extra}");
            assert!(c.values().all(|&k| k == 1), "{extra}");
        }
    }
}
