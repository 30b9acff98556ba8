//! Layer tar extraction on arbitrary bytes: must never panic, and whatever it creates stays
//! inside the layer directory (a sibling directory must stay empty).
#![no_main]

use std::os::fd::AsFd;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let jail = tempfile::tempdir().expect("tempdir");
    let layer = jail.path().join("layer");
    let outside = jail.path().join("outside");
    std::fs::create_dir(&layer).expect("mkdir");
    std::fs::create_dir(&outside).expect("mkdir");
    let fd = stratafs::sys::fs::open_host_dir(&layer).expect("open");
    let _ = stratafs::image::extract::unpack(data, fd.as_fd(), false);
    let escaped = std::fs::read_dir(&outside).expect("read").count();
    assert_eq!(escaped, 0, "an entry landed outside the layer");
});
