//! The store's metadata files: one header line `stratafs-store <version> sha256:<hex>` with
//! the digest of the JSON body that follows. A torn or edited file is detected on read, a
//! file from a newer stratafs is refused by version, and every write goes to a temporary name,
//! is synced, then renamed, so a reader sees the old or the new file, never half of one.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::image::ImageError;
use crate::image::digest::Digest;

/// Magic word of the header line.
const MAGIC: &str = "stratafs-store";
/// Format version written (and the highest one read).
pub const VERSION: u32 = 1;

/// Serializes `value` into the file format.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    let body =
        serde_json::to_vec_pretty(value).map_err(|e| ImageError::Internal2(e.to_string()))?;
    let mut out = format!("{MAGIC} {VERSION} {}\n", Digest::of(&body)).into_bytes();
    out.extend_from_slice(&body);
    out.push(b'\n');
    Ok(out)
}

/// Parses a metadata file's bytes (`what` names it in errors).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    let corrupt = |why: &str| ImageError::Corrupt(format!("{what}: {why}"));
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| corrupt("header is not text"))?;
    let mut f = header.split(' ');
    if f.next() != Some(MAGIC) {
        return Err(corrupt("not a stratafs store file"));
    }
    let version: u32 = f
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt("bad version"))?;
    if version > VERSION {
        return Err(corrupt(&format!(
            "format version {version} is newer than this stratafs reads ({VERSION})"
        )));
    }
    let want = f.next().ok_or_else(|| corrupt("no checksum"))?;
    let mut body = &bytes[nl + 1..];
    if body.last() == Some(&b'\n') {
        body = &body[..body.len() - 1];
    }
    if Digest::of(body).to_string() != want {
        return Err(corrupt("checksum mismatch (torn or edited file)"));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(&format!("malformed JSON: {e}")))
}

/// Writes `value` to `path` atomically (temporary name, fsync, rename).
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    write_bytes(path, &encode(value)?)
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let io = |e: std::io::Error| ImageError::Store(format!("{}: {e}", path.display()));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads and decodes `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes =
        std::fs::read(path).map_err(|e| ImageError::Store(format!("{}: {e}", path.display())))?;
    decode(&bytes, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_detected() {
        let v = vec!["a".to_string(), "b".to_string()];
        let bytes = encode(&v).expect("encode");
        assert_eq!(decode::<Vec<String>>(&bytes, "t").expect("decode"), v);
        let mut edited = bytes.clone();
        let last = edited.len() - 3;
        edited[last] = b'x';
        assert!(matches!(
            decode::<Vec<String>>(&edited, "t"),
            Err(ImageError::Corrupt(_))
        ));
        let torn = &bytes[..bytes.len() / 2];
        assert!(decode::<Vec<String>>(torn, "t").is_err());
        let newer = String::from_utf8(bytes)
            .expect("utf8")
            .replacen(" 1 ", " 9 ", 1);
        let err = decode::<Vec<String>>(newer.as_bytes(), "t").expect_err("newer");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
