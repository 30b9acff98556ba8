//! The store's metadata decoder (header line, version, checksum, JSON) and the image formats'
//! JSON on arbitrary bytes: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratafs::image::store::{ImageRecord, LayerRecord};

fuzz_target!(|data: &[u8]| {
    let _ = stratafs::image::meta::decode::<ImageRecord>(data, "fuzz");
    let _ = stratafs::image::meta::decode::<LayerRecord>(data, "fuzz");
    let _ = stratafs::image::oci::json::<stratafs::image::oci::Index>(data, "fuzz");
    let _ = stratafs::image::oci::json::<stratafs::image::oci::Manifest>(data, "fuzz");
    let _ = stratafs::image::oci::json::<stratafs::image::store::ImageConfig>(data, "fuzz");
});
