//! Name handling on arbitrary bytes: tar entry names (cleaned or refused, never absolute,
//! never `..`), whiteout names and the owner-override attribute values.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parts) = stratafs::image::extract::clean_name(data) {
        for p in parts {
            let b = p.as_bytes();
            assert!(!b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/'));
        }
    }
    let name = OsStr::from_bytes(data);
    if let Some(hidden) = stratafs::ovl::whiteout::hidden_by_wh(name) {
        assert_eq!(stratafs::ovl::whiteout::wh_name(hidden), name);
    }
    if let Some(owner) = stratafs::ovl::override_stat::Owner::parse(data) {
        let again = stratafs::ovl::override_stat::Owner::parse(owner.format().as_bytes());
        assert_eq!(again, Some(owner));
    }
});
