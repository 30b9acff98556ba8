//! FUSE passthrough: files read and written by the kernel straight from the real files, and
//! what that must never cost (see `src/fuse/passthrough.rs`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use crate::support::{Scratch, can_mount};

/// Reader opened on a lower file, then a writer: returns what the write open did and what the
/// reader reads afterwards; the lower file must be untouched either way.
fn reader_then_writer(extra: &str) -> (std::io::Result<()>, String) {
    let s = Scratch::new();
    s.write("l2/f", "original\n");
    s.mount_with(true, extra);
    let m = s.mnt();
    let reader = std::fs::File::open(m.join("f")).unwrap();
    let mut buf = [0u8; 64];
    let n = reader.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"original\n");
    let wrote = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("f"))
        .and_then(|mut w| w.write_all(b"CHANGED\n"));
    let n = reader.read_at(&mut buf, 0).unwrap();
    let seen = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(
        std::fs::read_to_string(s.path("l2/f")).unwrap(),
        "original\n",
        "a lower layer was written ({extra})"
    );
    drop(reader);
    // Once the reader is gone, writing works again, and a new open sees it.
    let mut w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    w.write_all(b"AFTER\n").unwrap();
    w.seek(SeekFrom::Start(0)).unwrap();
    let mut all = String::new();
    w.read_to_string(&mut all).unwrap();
    assert_eq!(
        all,
        if wrote.is_ok() {
            "AFTER\nD\n\n"
        } else {
            "AFTER\nal\n"
        }
    );
    assert_eq!(
        std::fs::read_to_string(s.path("l2/f")).unwrap(),
        "original\n"
    );
    (wrote, seen)
}

#[test]
fn a_lower_file_open_for_reading_is_refused_to_writers_never_written() {
    if !can_mount("a_lower_file_open_for_reading_is_refused_to_writers_never_written") {
        return;
    }
    let (wrote, seen) = reader_then_writer("");
    match wrote {
        // Passthrough on (root, Linux 6.9+): the reader's backing file is the lower one.
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{e}");
            assert_eq!(seen, "original\n");
        }
        // No passthrough here: kernel overlayfs's behaviour.
        Ok(()) => assert_eq!(seen, "CHANGED\n\n"),
    }
}

#[test]
fn without_passthrough_a_reader_sees_the_copy_up_like_kernel_overlayfs() {
    if !can_mount("without_passthrough_a_reader_sees_the_copy_up_like_kernel_overlayfs") {
        return;
    }
    let (wrote, seen) = reader_then_writer(",passthrough=off");
    wrote.expect("write open with passthrough=off");
    assert_eq!(seen, "CHANGED\n\n");
}

#[test]
fn passthrough_files_read_and_write_their_real_files() {
    if !can_mount("passthrough_files_read_and_write_their_real_files") {
        return;
    }
    let s = Scratch::new();
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(s.path("l2/big"), &big).unwrap();
    s.mount(true);
    let m = s.mnt();
    assert_eq!(std::fs::read(m.join("big")).unwrap(), big);
    std::fs::write(m.join("new"), &big[..1 << 20]).unwrap();
    assert_eq!(std::fs::read(s.path("u/new")).unwrap(), &big[..1 << 20]);
    // Two handles of one upper file share one backing file and see each other's writes.
    let a = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("new"))
        .unwrap();
    let b = std::fs::File::open(m.join("new")).unwrap();
    a.write_at(b"XYZ", 10).unwrap();
    let mut buf = [0u8; 3];
    b.read_at(&mut buf, 10).unwrap();
    assert_eq!(&buf, b"XYZ");
    assert_eq!(std::fs::metadata(m.join("new")).unwrap().len(), 1 << 20);
    a.set_len(5).unwrap();
    assert_eq!(std::fs::metadata(m.join("new")).unwrap().len(), 5);
    // The lower big file copied up by a write open after its readers are gone.
    std::fs::OpenOptions::new()
        .append(true)
        .open(m.join("big"))
        .unwrap()
        .write_all(b"!")
        .unwrap();
    assert_eq!(
        std::fs::metadata(m.join("big")).unwrap().len(),
        (4 << 20) + 1
    );
    assert_eq!(std::fs::read(s.path("l2/big")).unwrap(), big);
}
