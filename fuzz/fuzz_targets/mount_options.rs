//! The `-o` option parser on arbitrary strings: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts: Vec<String> = text.split('\n').map(str::to_string).collect();
    let _ = stratafs::ovl::params::Config::parse(&opts);
    let _ = stratafs::ovl::params::split_lowerdir(&text);
});
