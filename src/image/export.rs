//! `stratafs image export REF -o FILE`: an OCI archive (a tar of an OCI image layout) that
//! `podman load` and `skopeo` read.
//!
//! Each layer is archived again from its unpacked directory (sorted, so the same layer gives
//! the same tar), uncompressed; its digest is its diff id. The config is the image's own with
//! `rootfs.diff_ids` set to those digests, so the exported image id can differ from the
//! stored one when the original tars were laid out differently.

use std::io::{BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;

use crate::image::archive::{HashingWriter, LayerWriter};
use crate::image::digest::Digest;
use crate::image::progress::{CountingWriter, Progress};
use crate::image::store::Store;
use crate::image::{ImageError, oci};
use crate::sys;

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Writes image `reference` as an OCI archive to `out` (via a temporary name).
pub fn export(store: &Store, reference: &str, out: &Path) -> Result<Digest, ImageError> {
    let img = store.resolve(reference)?;
    let (config, _) = store.config(&img)?;
    let _guard = store.tmp_guard()?;
    let scratch = store.scratch("export")?;
    let result = write_archive(store, &img, &config, &scratch, out);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn write_archive(
    store: &Store,
    img: &crate::image::store::ImageRecord,
    config: &[u8],
    scratch: &Path,
    out: &Path,
) -> Result<Digest, ImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| ImageError::Store(format!("{}: {e}", p.display()))
    };
    let mut layers = Vec::new();
    for (i, diff) in img.layers.iter().enumerate() {
        let total = store.layer(diff).ok().map(|l| l.tar_size);
        let bar = Progress::new(format!("layer {}/{}", i + 1, img.layers.len()), total);
        let dir = store.layer_dir(diff);
        let fd = sys::fs::open_host_dir(&dir).map_err(io(&dir))?;
        let tmp = scratch.join(format!("layer{i}.tar"));
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let out = CountingWriter::new(BufWriter::new(file), bar);
        let mut w = LayerWriter::new(HashingWriter::new(out));
        w.add_tree(fd.as_fd(), Path::new(""))?;
        let (digest, size, counting) = w.finish()?.finish();
        let (mut inner, bar) = counting.into_parts();
        inner.flush().map_err(io(&tmp))?;
        bar.finish(&format!(" {}", digest.short()));
        layers.push((tmp, digest, size));
    }
    let mut cfg: serde_json::Value = oci::json(config, "image config")?;
    cfg["rootfs"] = serde_json::json!({
        "type": "layers",
        "diff_ids": layers.iter().map(|(_, d, _)| d.to_string()).collect::<Vec<_>>(),
    });
    let cfg_bytes = serde_json::to_vec(&cfg).map_err(|e| ImageError::Internal2(e.to_string()))?;
    let cfg_digest = Digest::of(&cfg_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": cfg_digest.to_string(), "size": cfg_bytes.len()},
        "layers": layers.iter().map(|(_, d, s)| serde_json::json!({
            "mediaType": LAYER_TYPE, "digest": d.to_string(), "size": s,
        })).collect::<Vec<_>>(),
    });
    let man_bytes =
        serde_json::to_vec(&manifest).map_err(|e| ImageError::Internal2(e.to_string()))?;
    let man_digest = Digest::of(&man_bytes);
    let mut desc = serde_json::json!({
        "mediaType": MANIFEST_TYPE, "digest": man_digest.to_string(), "size": man_bytes.len(),
    });
    if let Some(name) = img.names.first() {
        // The OCI annotation holds the tag; containerd's (and podman's) the full name.
        let tag = name.rsplit_once(':').map_or(name.as_str(), |(_, t)| t);
        desc["annotations"] = serde_json::json!({
            "org.opencontainers.image.ref.name": tag,
            "io.containerd.image.name": name,
        });
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    let index_bytes =
        serde_json::to_vec(&index).map_err(|e| ImageError::Internal2(e.to_string()))?;

    let tmp_out = out.with_extension(format!("tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp_out).map_err(io(&tmp_out))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let write = (|| -> std::io::Result<()> {
        put(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        put(&mut tar, "index.json", &index_bytes)?;
        put(
            &mut tar,
            &format!("blobs/sha256/{}", man_digest.hex()),
            &man_bytes,
        )?;
        put(
            &mut tar,
            &format!("blobs/sha256/{}", cfg_digest.hex()),
            &cfg_bytes,
        )?;
        for (path, digest, _) in &layers {
            // Fixed metadata (not the scratch file's), so exports are reproducible.
            let f = std::fs::File::open(path)?;
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(f.metadata()?.len());
            tar.append_data(&mut h, format!("blobs/sha256/{}", digest.hex()), f)?;
        }
        let mut inner = tar.into_inner()?;
        inner.flush()?;
        inner.get_ref().sync_all()
    })();
    if let Err(e) = write {
        let _ = std::fs::remove_file(&tmp_out);
        return Err(io(out)(e));
    }
    std::fs::rename(&tmp_out, out).map_err(io(out))?;
    Ok(cfg_digest)
}

/// Adds a file holding `bytes` to the archive.
fn put<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(bytes.len() as u64);
    h.set_mtime(0);
    tar.append_data(&mut h, name, bytes)
}
