//! The content-addressed layer store.
//!
//! ```text
//! ROOT/blobs/sha256/<hex>      image configs (the image id is the config's digest)
//! ROOT/layers/<hex>/           unpacked layers, by diff id: used directly as lowerdirs
//! ROOT/layers/<hex>.json       what was unpacked (size, entries)
//! ROOT/images/<hex>.json       an image: its names and its layers (diff ids, bottom first)
//! ROOT/tmp/                    imports in progress (removed on failure and by the next run)
//! ROOT/locks/                  flock files: the store's metadata, and one per layer
//! ```
//! A layer is unpacked into `tmp/`, checked against its diff id, and only then renamed into
//! `layers/`, under its own lock: two imports sharing a layer unpack it once, and a crash
//! leaves no half layer under a real name. Metadata files are versioned and checksummed
//! ([`meta`]).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::image::digest::{Digest, HashingReader};
use crate::image::oci::{self, FoundImage, LayerSource, SourceDir};
use crate::image::progress::{Counting, Progress};
use crate::image::{ImageError, extract, meta};
use crate::sys;

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config's digest.
    pub id: Digest,
    /// `name:tag` references (none: a dangling image, removed by prune).
    pub names: Vec<String>,
    /// Diff ids of its layers, bottom first.
    pub layers: Vec<Digest>,
    /// Seconds since the epoch when it entered the store.
    pub added: u64,
    /// What it was imported from (a path) or made by (commit).
    pub source: String,
}

/// An unpacked layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
    /// Entries unpacked.
    pub entries: u64,
}

/// What the parts of an image config stratafs uses look like.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ImageConfig {
    /// `rootfs`.
    #[serde(default)]
    pub rootfs: RootFs,
    /// `config` (the runtime defaults).
    #[serde(default)]
    pub config: RunDefaults,
}

/// `rootfs` of an image config.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Bottom first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// `config` of an image config.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunDefaults {
    /// `K=V` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default command.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User.
    #[serde(default)]
    pub user: Option<String>,
}

/// An opened store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

/// Shows progress on stderr when it is a terminal.
fn progress(line: &str) {
    if rustix::termios::isatty(std::io::stderr()) {
        eprintln!("{line}");
    }
}

/// Human units: `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `name` with `:latest` when it has no tag.
pub fn normalize_name(name: &str) -> Result<String, ImageError> {
    let bad = || ImageError::Input(format!("bad image name {name:?} (expected NAME[:TAG])"));
    if name.is_empty()
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
        || name.starts_with("sha256:")
    {
        return Err(bad());
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    Ok(if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    })
}

impl Store {
    /// Opens (creating) the store at `root`, removing what crashed imports left in `tmp/`.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        for d in ["blobs/sha256", "layers", "images", "tmp", "locks"] {
            let p = root.join(d);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(|e| ImageError::Store(format!("{}: {e}", p.display())))?;
        }
        let store = Store {
            root: root.to_path_buf(),
        };
        store.sweep_tmp();
        Ok(store)
    }

    /// Where unpacked layer `diff` lives.
    pub fn layer_dir(&self, diff: &Digest) -> PathBuf {
        self.root.join("layers").join(diff.hex())
    }

    fn io(&self, what: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
        let what = what.to_path_buf();
        move |e| ImageError::Store(format!("{}: {e}", what.display()))
    }

    /// Takes the exclusive lock `name` (held until the file is dropped).
    fn lock(&self, name: &str) -> Result<File, ImageError> {
        let p = self.root.join("locks").join(format!("{name}.lock"));
        let f = File::create(&p).map_err(self.io(&p))?;
        rustix::fs::flock(&f, FlockOperation::LockExclusive)
            .map_err(|e| ImageError::Store(format!("{}: {e}", p.display())))?;
        Ok(f)
    }

    /// Removes leftovers of imports whose process is gone (their lock file is free).
    fn sweep_tmp(&self) {
        let Ok(guard) = self.try_lock_tmp() else {
            return;
        };
        if let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let _ = sys::fs::remove_host_tree(&e.path());
            }
        }
        drop(guard);
    }

    /// The lock every import holds shared while it has scratch files in `tmp/`; the sweep
    /// takes it exclusively, without waiting.
    fn try_lock_tmp(&self) -> Result<File, ImageError> {
        let p = self.root.join("locks/tmp.lock");
        let f = File::create(&p).map_err(self.io(&p))?;
        rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| ImageError::Store(e.to_string()))?;
        Ok(f)
    }

    /// Keeps `tmp/` from being swept while the caller has scratch files there.
    pub fn tmp_guard(&self) -> Result<File, ImageError> {
        self.share_tmp()
    }

    fn share_tmp(&self) -> Result<File, ImageError> {
        let p = self.root.join("locks/tmp.lock");
        let f = File::create(&p).map_err(self.io(&p))?;
        rustix::fs::flock(&f, FlockOperation::LockShared)
            .map_err(|e| ImageError::Store(e.to_string()))?;
        Ok(f)
    }

    /// A new scratch directory in `tmp/` (removed by the caller, or by a later sweep).
    pub fn scratch(&self, what: &str) -> Result<PathBuf, ImageError> {
        let mut buf = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty());
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}-{}", hex::encode(buf)));
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&p)
            .map_err(self.io(&p))?;
        Ok(p)
    }

    /// Every image record, sorted by time added (newest first).
    pub fn images(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(self.io(&dir))?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                out.push(meta::read::<ImageRecord>(&p)?);
            }
        }
        out.sort_by(|a, b| b.added.cmp(&a.added).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The image `reference` names: `NAME[:TAG]`, `sha256:<id>`, or a unique id prefix of at
    /// least 4 hex digits.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let images = self.images()?;
        if let Ok(name) = normalize_name(reference) {
            if let Some(img) = images.iter().find(|i| i.names.contains(&name)) {
                return Ok(img.clone());
            }
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<&ImageRecord> = images
                .iter()
                .filter(|i| i.id.hex().starts_with(hex))
                .collect();
            match found.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                _ => {
                    return Err(ImageError::Input(format!(
                        "{reference:?} matches {} images; give more digits",
                        found.len()
                    )));
                }
            }
        }
        Err(ImageError::NotFound(reference.to_string()))
    }

    /// The config of image `img`.
    pub fn config(&self, img: &ImageRecord) -> Result<(Vec<u8>, ImageConfig), ImageError> {
        let p = self.root.join("blobs/sha256").join(img.id.hex());
        let bytes = std::fs::read(&p).map_err(self.io(&p))?;
        if Digest::of(&bytes) != img.id {
            return Err(ImageError::Corrupt(format!(
                "{}: config does not match its digest",
                p.display()
            )));
        }
        let cfg = oci::json(&bytes, "image config")?;
        Ok((bytes, cfg))
    }

    /// Lower directories of `img`, top first (the order of `lowerdir=`).
    pub fn lowerdirs(&self, img: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        img.layers
            .iter()
            .rev()
            .map(|d| {
                let p = self.layer_dir(d);
                match p.is_dir() {
                    true => Ok(p),
                    false => Err(ImageError::Corrupt(format!(
                        "layer {d} of image {} is missing",
                        img.id.short()
                    ))),
                }
            })
            .collect()
    }

    /// The layer record of `diff`.
    pub fn layer(&self, diff: &Digest) -> Result<LayerRecord, ImageError> {
        meta::read(
            &self
                .root
                .join("layers")
                .join(format!("{}.json", diff.hex())),
        )
    }

    /// Imports the image at `path` (OCI layout directory or archive, docker archive, plain
    /// rootfs tarball), naming it `tag` (or the name the source gives).
    pub fn import(
        &self,
        path: &Path,
        tag: Option<&str>,
        platform: &str,
    ) -> Result<ImageRecord, ImageError> {
        let tag = tag.map(normalize_name).transpose()?;
        let _tmp_guard = self.share_tmp()?;
        let meta_in = std::fs::metadata(path)
            .map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))?;
        let started = Instant::now();
        let (found, scratch) = if meta_in.is_dir() {
            (SourceDir::open(path)?.find_image(platform)?, None)
        } else if is_image_archive(path)? {
            let scratch = self.scratch("import")?;
            let res = self.unpack_archive(path, &scratch, platform);
            match res {
                Ok(found) => (found, Some(scratch)),
                Err(e) => {
                    let _ = sys::fs::remove_host_tree(&scratch);
                    return Err(e);
                }
            }
        } else {
            return self.import_rootfs(path, tag);
        };
        let result = self.import_found(&found, path, &scratch, tag, started);
        if let Some(s) = scratch {
            let _ = sys::fs::remove_host_tree(&s);
        }
        result
    }

    fn unpack_archive(
        &self,
        path: &Path,
        scratch: &Path,
        platform: &str,
    ) -> Result<FoundImage, ImageError> {
        let f =
            File::open(path).map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))?;
        let dir = sys::fs::open_host_dir(scratch).map_err(self.io(scratch))?;
        oci::unpack_archive(f, dir.as_fd())?;
        SourceDir::from_fd(dir).find_image(platform)
    }

    fn import_found(
        &self,
        found: &FoundImage,
        path: &Path,
        scratch: &Option<PathBuf>,
        tag: Option<String>,
        started: Instant,
    ) -> Result<ImageRecord, ImageError> {
        let source = match scratch {
            Some(s) => SourceDir::open(s)?,
            None => SourceDir::open(path)?,
        };
        let cfg: ImageConfig = oci::json(&found.config, "image config")?;
        if cfg.rootfs.kind != "layers" || cfg.rootfs.diff_ids.len() != found.layers.len() {
            return Err(ImageError::Format(format!(
                "the config lists {} diff ids (rootfs type {:?}) for {} layers",
                cfg.rootfs.diff_ids.len(),
                cfg.rootfs.kind,
                found.layers.len()
            )));
        }
        let mut total = 0;
        for (i, (layer, diff)) in found.layers.iter().zip(&cfg.rootfs.diff_ids).enumerate() {
            let file = source.open_file(&layer.path)?;
            total += self
                .add_layer(file, layer, Some(diff), i + 1, found.layers.len())?
                .tar_size;
        }
        let name = tag.or_else(|| found.name.as_deref().and_then(|n| normalize_name(n).ok()));
        let rec = self.add_image(&found.config, cfg.rootfs.diff_ids.clone(), name, path)?;
        let secs = started.elapsed().as_secs_f64();
        progress(&format!(
            "imported {} ({}, {} layers, {} in {secs:.2} s, {}/s)",
            rec.id.short(),
            found.format,
            found.layers.len(),
            human(total),
            human((total as f64 / secs.max(1e-6)) as u64)
        ));
        Ok(rec)
    }

    /// A plain rootfs tarball (`docker import`): one layer and a generated config.
    fn import_rootfs(&self, path: &Path, tag: Option<String>) -> Result<ImageRecord, ImageError> {
        let file =
            File::open(path).map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))?;
        let src = LayerSource {
            path: path.display().to_string(),
            blob_digest: None,
            size: None,
        };
        let layer = self.add_layer(file, &src, None, 1, 1)?;
        let (os, arch) = oci::host_platform()
            .split_once('/')
            .map(|(o, a)| (o.to_string(), a.to_string()))
            .unwrap_or_default();
        let config = serde_json::json!({
            "architecture": arch,
            "os": os,
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [layer.diff_id.to_string()] },
            "history": [{ "created_by": format!("stratafs image import {}", path.display()) }],
        });
        let bytes =
            serde_json::to_vec(&config).map_err(|e| ImageError::Internal2(e.to_string()))?;
        self.add_image(&bytes, vec![layer.diff_id], tag, path)
    }

    /// Unpacks one layer blob (verified against `blob_digest` and `diff`), unless the store
    /// has it already. With no expected `diff` (a rootfs tarball) the computed one is used.
    pub fn add_layer(
        &self,
        mut file: File,
        src: &LayerSource,
        diff: Option<&Digest>,
        n: usize,
        of: usize,
    ) -> Result<LayerRecord, ImageError> {
        if let Some(d) = diff {
            if let Ok(rec) = self.layer(d) {
                if self.layer_dir(d).is_dir() {
                    progress(&format!(
                        "layer {n}/{of} {}: already in the store",
                        d.short()
                    ));
                    return Ok(rec);
                }
            }
        }
        let _lock = match diff {
            Some(d) => Some(self.lock(d.hex())?),
            None => None,
        };
        if let Some(d) = diff {
            // Another import may have unpacked it while we waited for the lock.
            if let (Ok(rec), true) = (self.layer(d), self.layer_dir(d).is_dir()) {
                return Ok(rec);
            }
        }
        if let (Some(size), Ok(m)) = (src.size, file.metadata()) {
            if m.len() != size {
                return Err(ImageError::Digest(format!(
                    "{}: {} bytes, the manifest says {size}",
                    src.path,
                    m.len()
                )));
            }
        }
        let compression = oci::detect_compression(&mut file)
            .map_err(|e| ImageError::Input(format!("{}: {e}", src.path)))?;
        let total = file.metadata().ok().map(|m| m.len());
        let mut bar = Progress::new(format!("layer {n}/{of}"), total);
        let scratch = self.scratch("layer")?;
        let result = (|| {
            let dest = sys::fs::open_host_dir(&scratch).map_err(self.io(&scratch))?;
            let mut blob = HashingReader::new(Counting::new(file, &mut bar));
            let (got_diff, tar_size, unpacked) = {
                let stream = oci::decompressed(&mut blob, compression)?;
                let mut tar = HashingReader::new(stream);
                let unpacked =
                    extract::unpack(&mut tar, dest.as_fd(), rustix::process::geteuid().is_root())?;
                let (d, size) = tar
                    .finish()
                    .map_err(|e| ImageError::Tar(format!("{}: {e}", src.path)))?;
                (d, size, unpacked)
            };
            let (got_blob, _) = blob
                .finish()
                .map_err(|e| ImageError::Tar(format!("{}: {e}", src.path)))?;
            if let Some(want) = &src.blob_digest {
                if &got_blob != want {
                    return Err(ImageError::Digest(format!(
                        "{}: blob hashes to {got_blob}, not {want}",
                        src.path
                    )));
                }
            }
            if let Some(want) = diff {
                if &got_diff != want {
                    return Err(ImageError::Digest(format!(
                        "{}: layer content hashes to {got_diff}, the config says {want}",
                        src.path
                    )));
                }
            }
            Ok((got_diff, tar_size, unpacked))
        })();
        let (diff_id, tar_size, unpacked) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = sys::fs::remove_host_tree(&scratch);
                return Err(e);
            }
        };
        if unpacked.skipped_devices > 0 {
            eprintln!(
                "stratafs: layer {}: {} device nodes skipped (no privilege to make them)",
                diff_id.short(),
                unpacked.skipped_devices
            );
        }
        let dest = self.layer_dir(&diff_id);
        if dest.is_dir() {
            // A rootfs tarball already imported: keep the first copy.
            let _ = sys::fs::remove_host_tree(&scratch);
        } else {
            let sync = File::open(&scratch).map_err(self.io(&scratch))?;
            let _ = rustix::fs::syncfs(&sync);
            std::fs::rename(&scratch, &dest).map_err(self.io(&dest))?;
        }
        let rec = LayerRecord {
            diff_id: diff_id.clone(),
            tar_size,
            entries: unpacked.entries,
        };
        meta::write(
            &self
                .root
                .join("layers")
                .join(format!("{}.json", diff_id.hex())),
            &rec,
        )?;
        bar.finish(&format!(
            " {} ({} of layer data)",
            diff_id.short(),
            human(tar_size)
        ));
        Ok(rec)
    }

    /// Records an image (config blob, then the record), moving `name` to it.
    pub fn add_image(
        &self,
        config: &[u8],
        layers: Vec<Digest>,
        name: Option<String>,
        source: &Path,
    ) -> Result<ImageRecord, ImageError> {
        let id = Digest::of(config);
        meta::write_bytes(&self.root.join("blobs/sha256").join(id.hex()), config)?;
        let _lock = self.lock("store")?;
        let mut rec = match self.images()?.into_iter().find(|i| i.id == id) {
            Some(existing) => existing,
            None => ImageRecord {
                id: id.clone(),
                names: Vec::new(),
                layers,
                added: now(),
                source: source.display().to_string(),
            },
        };
        if let Some(name) = name {
            for mut other in self
                .images()?
                .into_iter()
                .filter(|i| i.id != id && i.names.contains(&name))
            {
                other.names.retain(|n| n != &name);
                self.write_image(&other)?;
            }
            if !rec.names.contains(&name) {
                rec.names.push(name);
            }
        }
        self.write_image(&rec)?;
        Ok(rec)
    }

    fn write_image(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        meta::write(
            &self
                .root
                .join("images")
                .join(format!("{}.json", rec.id.hex())),
            rec,
        )
    }

    /// Untags `reference` (a name), or removes the image it names (an id, or its last name);
    /// then deletes the layers no image uses. Returns what was done, one line each.
    pub fn remove(&self, reference: &str) -> Result<Vec<String>, ImageError> {
        let mut img = self.resolve(reference)?;
        let _lock = self.lock("store")?;
        let mut done = Vec::new();
        let by_name = normalize_name(reference)
            .ok()
            .filter(|n| img.names.contains(n));
        match by_name {
            Some(name) if img.names.len() > 1 => {
                img.names.retain(|n| n != &name);
                self.write_image(&img)?;
                done.push(format!("untagged {name}"));
                return Ok(done);
            }
            _ => {}
        }
        for n in &img.names {
            done.push(format!("untagged {n}"));
        }
        let p = self
            .root
            .join("images")
            .join(format!("{}.json", img.id.hex()));
        std::fs::remove_file(&p).map_err(self.io(&p))?;
        let _ = std::fs::remove_file(self.root.join("blobs/sha256").join(img.id.hex()));
        done.push(format!("deleted {}", img.id));
        for d in self.gc_layers()? {
            done.push(format!("deleted layer {d}"));
        }
        Ok(done)
    }

    /// Removes images without a name, then unused layers.
    pub fn prune(&self) -> Result<Vec<String>, ImageError> {
        let mut done = Vec::new();
        for img in self.images()?.into_iter().filter(|i| i.names.is_empty()) {
            done.extend(self.remove(&img.id.to_string())?);
        }
        let _lock = self.lock("store")?;
        for d in self.gc_layers()? {
            done.push(format!("deleted layer {d}"));
        }
        Ok(done)
    }

    /// Deletes layers that no image uses (caller holds the store lock).
    fn gc_layers(&self) -> Result<Vec<Digest>, ImageError> {
        let used: std::collections::HashSet<Digest> =
            self.images()?.into_iter().flat_map(|i| i.layers).collect();
        let dir = self.root.join("layers");
        let mut gone = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(self.io(&dir))?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let hex = name.trim_end_matches(".json");
            let Ok(d) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            if used.contains(&d) || name.ends_with(".json") {
                continue;
            }
            let _lock = self.lock(d.hex())?;
            sys::fs::remove_host_tree(&e.path()).map_err(self.io(&e.path()))?;
            let _ = std::fs::remove_file(dir.join(format!("{hex}.json")));
            gone.push(d);
        }
        // Records whose directory is gone (a crash between the two removals).
        for e in std::fs::read_dir(&dir).map_err(self.io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".json") {
                if !dir.join(hex).is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(gone)
    }
}

/// Whether the file at `path` is a tar whose top level has `index.json` or `manifest.json`
/// (an image archive) rather than a root filesystem.
fn is_image_archive(path: &Path) -> Result<bool, ImageError> {
    let mut f =
        File::open(path).map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))?;
    if oci::detect_compression(&mut f).map_err(|e| ImageError::Input(e.to_string()))?
        != oci::Compression::None
    {
        return Ok(false);
    }
    let mut ar = tar::Archive::new(f.take(u64::MAX));
    let entries = ar
        .entries()
        .map_err(|e| ImageError::Tar(format!("{}: {e}", path.display())))?;
    for e in entries {
        let e = e.map_err(|e| ImageError::Tar(format!("{}: {e}", path.display())))?;
        let name = e.path_bytes();
        let name = name.strip_prefix(b"./").unwrap_or(&name);
        if name == b"index.json" || name == b"manifest.json" || name == b"oci-layout" {
            return Ok(true);
        }
    }
    Ok(false)
}
