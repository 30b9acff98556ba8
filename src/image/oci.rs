//! Image formats read on import: OCI image layouts (a directory, or a tar of one), docker
//! archives (`docker save` / `podman save`), and plain rootfs tarballs (`docker import`).
//!
//! Archives are first unpacked (regular files, directories and symlinks only, names cleaned)
//! into a scratch directory of the store; every file of the source is then opened beneath that
//! directory (symlinks allowed only inside it), and every blob is checked against its digest
//! while it is read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::Deserialize;

use crate::image::ImageError;
use crate::image::digest::{Digest, HashingReader};
use crate::image::extract::clean_name;
use crate::sys;

/// OCI `application/vnd.oci.image.index.v1+json` (and Docker manifest lists).
pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// An OCI content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// Content address.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries).
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Annotations (ref names).
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

/// `os`/`architecture`/`variant` of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8`.
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image index.
#[derive(Debug, Deserialize)]
pub struct Index {
    /// Manifests (or nested indexes).
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    /// The config blob.
    pub config: Descriptor,
    /// Layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

/// One entry of a docker archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where a layer's bytes are and what they must hash to.
#[derive(Debug, Clone)]
pub struct LayerSource {
    /// Path inside the source directory.
    pub path: String,
    /// Digest of the (possibly compressed) blob, when the format records one.
    pub blob_digest: Option<Digest>,
    /// Size of the blob, when recorded.
    pub size: Option<u64>,
}

/// An image found in a source: config bytes, layers bottom first, a name.
#[derive(Debug)]
pub struct FoundImage {
    /// The config JSON exactly as stored (its digest is the image id).
    pub config: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<LayerSource>,
    /// `name:tag` the source gives, if any.
    pub name: Option<String>,
    /// Format, for messages.
    pub format: &'static str,
}

/// A source directory (given, or unpacked from an archive) opened for reading.
pub struct SourceDir {
    root: OwnedFd,
}

impl SourceDir {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<SourceDir, ImageError> {
        let root = sys::fs::open_host_dir(path)
            .map_err(|e| ImageError::Input(format!("{}: {e}", path.display())))?;
        Ok(SourceDir { root })
    }

    /// Wraps an already opened directory.
    pub fn from_fd(root: OwnedFd) -> SourceDir {
        SourceDir { root }
    }

    /// Opens `rel` for reading; symlinks may be followed but never out of the directory.
    pub fn open_file(&self, rel: &str) -> Result<std::fs::File, ImageError> {
        let parts = clean_name(rel.as_bytes())?;
        let path: std::path::PathBuf = parts.iter().collect();
        let fd = rustix::fs::openat2(
            &self.root,
            &path,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| ImageError::Format(format!("{rel}: {e}")))?;
        Ok(std::fs::File::from(fd))
    }

    fn exists(&self, rel: &str) -> bool {
        self.open_file(rel).is_ok()
    }

    /// Reads a small JSON file (at most 16 MiB).
    fn read_small(&self, rel: &str) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        self.open_file(rel)?
            .take(16 << 20)
            .read_to_end(&mut buf)
            .map_err(|e| ImageError::Format(format!("{rel}: {e}")))?;
        Ok(buf)
    }

    /// Reads a blob by digest and checks it.
    fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let rel = blob_path(&d.digest);
        let mut r = HashingReader::new(self.open_file(&rel)?.take(16 << 20));
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)
            .map_err(|e| ImageError::Format(format!("{rel}: {e}")))?;
        let (got, _) = r
            .finish()
            .map_err(|e| ImageError::Format(format!("{rel}: {e}")))?;
        if got != d.digest {
            return Err(ImageError::Digest(format!(
                "{rel}: content hashes to {got}, not {}",
                d.digest
            )));
        }
        Ok(buf)
    }

    /// The image in this directory: an OCI layout (`index.json`) or a docker archive
    /// (`manifest.json`).
    pub fn find_image(&self, platform: &str) -> Result<FoundImage, ImageError> {
        if self.exists("index.json") {
            return self.find_oci(platform);
        }
        if self.exists("manifest.json") {
            return self.find_docker();
        }
        Err(ImageError::Input(
            "neither an OCI layout (index.json) nor a docker archive (manifest.json)".into(),
        ))
    }

    fn find_oci(&self, platform: &str) -> Result<FoundImage, ImageError> {
        let index: Index = json(&self.read_small("index.json")?, "index.json")?;
        let mut desc = pick(&index.manifests, platform)?;
        let mut name = ref_name(&desc);
        // One level of nesting: an index pointing at a per-platform index (docker save).
        if INDEX_TYPES.contains(&desc.media_type.as_str()) {
            let inner: Index = json(&self.read_blob(&desc)?, "nested index")?;
            desc = pick(&inner.manifests, platform)?;
            name = name.or_else(|| ref_name(&desc));
        }
        let manifest: Manifest = json(&self.read_blob(&desc)?, "manifest")?;
        let config = self.read_blob(&manifest.config)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| LayerSource {
                path: blob_path(&l.digest),
                blob_digest: Some(l.digest.clone()),
                size: Some(l.size),
            })
            .collect();
        Ok(FoundImage {
            config,
            layers,
            name,
            format: "OCI layout",
        })
    }

    fn find_docker(&self) -> Result<FoundImage, ImageError> {
        let entries: Vec<DockerEntry> = json(&self.read_small("manifest.json")?, "manifest.json")?;
        let entry = match entries.as_slice() {
            [one] => one,
            [] => return Err(ImageError::Format("manifest.json lists no image".into())),
            _ => {
                return Err(ImageError::Input(format!(
                    "the archive holds {} images; stratafs imports archives of one",
                    entries.len()
                )));
            }
        };
        let config = self.read_small(&entry.config)?;
        // The config's file name is its digest in both layouts docker writes.
        let stem = entry
            .config
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".json");
        if let Ok(d) = Digest::parse(&format!("sha256:{stem}")) {
            if Digest::of(&config) != d {
                return Err(ImageError::Digest(format!(
                    "{}: content does not match its name",
                    entry.config
                )));
            }
        }
        let layers = entry
            .layers
            .iter()
            .map(|p| LayerSource {
                path: p.clone(),
                blob_digest: p
                    .strip_prefix("blobs/sha256/")
                    .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok()),
                size: None,
            })
            .collect();
        Ok(FoundImage {
            config,
            layers,
            name: entry.repo_tags.as_ref().and_then(|t| t.first().cloned()),
            format: "docker archive",
        })
    }
}

/// `blobs/sha256/<hex>`.
fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// A name from the annotations a layout's index carries.
fn ref_name(d: &Descriptor) -> Option<String> {
    let a = &d.annotations;
    a.get("io.containerd.image.name")
        .or_else(|| {
            a.get("org.opencontainers.image.ref.name")
                .filter(|n| n.contains(':') || n.contains('/'))
        })
        .cloned()
}

/// The manifest for `platform` (`os/arch[/variant]`), or the only one.
fn pick(manifests: &[Descriptor], platform: &str) -> Result<Descriptor, ImageError> {
    let mut it = platform.split('/');
    let (os, arch, variant) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next());
    let matching: Vec<&Descriptor> = manifests
        .iter()
        .filter(|m| match &m.platform {
            Some(p) => {
                p.os == os
                    && p.architecture == arch
                    && (variant.is_none() || p.variant.as_deref() == variant)
            }
            None => true,
        })
        // Attestation manifests (docker buildx) are not images.
        .filter(|m| !m.annotations.contains_key("vnd.docker.reference.type"))
        .collect();
    match matching.first() {
        Some(m) => Ok((*m).clone()),
        None if manifests.is_empty() => {
            Err(ImageError::Format("the index lists no manifest".into()))
        }
        None => Err(ImageError::Input(format!(
            "no image for platform {platform} (available: {}); use --platform",
            manifests
                .iter()
                .filter_map(|m| m
                    .platform
                    .as_ref()
                    .map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Parses JSON, naming the file in the error.
pub fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ImageError::Format(format!("{what}: malformed JSON: {e}")))
}

/// The host platform as OCI names it (`linux/amd64`, `linux/arm64`, ...).
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// How a blob is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

/// Peeks at the magic number of `file` (then rewinds).
pub fn detect_compression(file: &mut std::fs::File) -> io::Result<Compression> {
    use std::io::Seek;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.rewind()?;
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// A reader of the uncompressed tar stream of `blob`.
pub fn decompressed<'a, R: Read + 'a>(
    blob: R,
    c: Compression,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    Ok(match c {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(blob)
                .map_err(|e| ImageError::Format(format!("zstd: {e}")))?,
        ),
    })
}

/// Unpacks an image archive (a tar of an OCI layout or a docker archive) into `dest`:
/// directories, regular files and symlinks only, names cleaned, nothing outside `dest`.
pub fn unpack_archive<R: Read>(archive: R, dest: BorrowedFd<'_>) -> Result<(), ImageError> {
    let mut ar = tar::Archive::new(archive);
    let entries = ar.entries().map_err(|e| ImageError::Tar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::Tar(e.to_string()))?;
        let raw = entry.path_bytes().into_owned();
        let parts = clean_name(&raw)?;
        let Some((name, parents)) = parts.split_last() else {
            continue;
        };
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let ctx = |e: io::Error| ImageError::Tar(format!("{shown}: {e}"));
        let mut dir = sys::fs::open_dir_path(dest, OsStr::new(".")).map_err(ctx)?;
        for p in parents {
            match sys::fs::make_dir(dir.as_fd(), p, 0o700) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(ctx(e)),
                _ => {}
            }
            dir = sys::fs::open_dir_path(dir.as_fd(), p).map_err(|_| {
                ImageError::Unsafe(format!("{shown}: a parent is not a plain directory"))
            })?;
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => match sys::fs::make_dir(dir.as_fd(), name, 0o700) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(ctx(e)),
                _ => {}
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let fd =
                    sys::fs::create_file(dir.as_fd(), name, OFlags::WRONLY, 0o600).map_err(ctx)?;
                io::copy(&mut entry, &mut std::fs::File::from(fd))
                    .map_err(|e| ImageError::Tar(format!("{shown}: {e}")))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                sys::fs::make_symlink(OsStr::from_bytes(&target), dir.as_fd(), name)
                    .map_err(ctx)?;
            }
            _ => {} // nothing else belongs in an image archive
        }
    }
    Ok(())
}
