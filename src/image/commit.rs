//! `stratafs commit UPPERDIR --from REF`: a container's upper layer becomes a new image
//! layer on top of REF's, as `docker commit` does.
//!
//! The upper directory says *what* changed; the container's merged view (the union mounted
//! read-only, as the container saw it) says *what it looks like now*. So whiteouts (every
//! format) become `.wh.NAME`, opaque directories `.wh..wh..opq`, a renamed directory (an
//! overlay redirect) becomes an opaque directory with its whole merged content, a
//! metadata-only copy-up gets its data from below, and hard links stay links.

use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::image::archive::{HashingWriter, LayerWriter, join, sorted_names};
use crate::image::oci::LayerSource;
use crate::image::progress::{CountingWriter, Progress};
use crate::image::store::{ImageRecord, Store};
use crate::image::{ImageError, oci};
use crate::ovl::whiteout;
use crate::run::daemon::Daemon;
use crate::sys;

/// What to record about the commit.
#[derive(Debug, Default)]
pub struct CommitInfo {
    /// `-m`: the history comment.
    pub message: Option<String>,
    /// `--author`.
    pub author: Option<String>,
}

/// Commits `upper` (on top of image `from`) as a new image named `tag`.
pub fn commit(
    store: &Store,
    upper: &Path,
    from: &str,
    tag: &str,
    info: &CommitInfo,
) -> Result<ImageRecord, ImageError> {
    let tag = crate::image::store::normalize_name(tag)?;
    let base = store.resolve(from)?;
    let (config, _) = store.config(&base)?;
    let lowers = store.lowerdirs(&base)?;
    let upper = std::fs::canonicalize(upper)
        .map_err(|e| ImageError::Input(format!("{}: {e}", upper.display())))?;
    if !upper.is_dir() {
        return Err(ImageError::Input(format!(
            "{} is not a directory",
            upper.display()
        )));
    }
    crate::run::enter_private_namespaces().map_err(|e| ImageError::Store(e.to_string()))?;
    let _guard = store.tmp_guard()?;
    let scratch = store.scratch("commit")?;
    let result = (|| {
        // A workdir on the upper's filesystem, as a mount with an upper needs one.
        let work = sibling_workdir(&upper)?;
        let mnt = scratch.join("merged");
        std::fs::create_dir(&mnt)
            .map_err(|e| ImageError::Store(format!("{}: {e}", mnt.display())))?;
        let daemon = Daemon::start(&lowers, &upper, &work, &mnt, ",ro")
            .map_err(|e| ImageError::Store(e.to_string()));
        let written = daemon.and_then(|d| {
            let r = write_diff(&upper, &mnt, &scratch.join("layer.tar"));
            d.stop();
            r
        });
        let _ = std::fs::remove_dir_all(&work);
        written
    })();
    let (diff_id, _entries) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    let tar_path = scratch.join("layer.tar");
    let file = std::fs::File::open(&tar_path)
        .map_err(|e| ImageError::Store(format!("{}: {e}", tar_path.display())))?;
    let src = LayerSource {
        path: "committed layer".into(),
        blob_digest: Some(diff_id.clone()),
        size: None,
    };
    let added = store.add_layer(file, &src, Some(&diff_id), 1, 1);
    let _ = std::fs::remove_dir_all(&scratch);
    added?;
    let mut cfg: serde_json::Value = oci::json(&config, "base image config")?;
    let created = rfc3339_now();
    let mut history = serde_json::json!({
        "created": created,
        "created_by": format!("stratafs commit {}", upper.display()),
    });
    if let Some(m) = &info.message {
        history["comment"] = serde_json::json!(m);
    }
    if let Some(a) = &info.author {
        history["author"] = serde_json::json!(a);
        cfg["author"] = serde_json::json!(a);
    }
    cfg["created"] = serde_json::json!(created);
    push(
        &mut cfg,
        "/rootfs/diff_ids",
        serde_json::json!(diff_id.to_string()),
    )?;
    push(&mut cfg, "/history", history)?;
    let bytes = serde_json::to_vec(&cfg).map_err(|e| ImageError::Internal2(e.to_string()))?;
    let mut layers = base.layers.clone();
    layers.push(diff_id);
    store.add_image(&bytes, layers, Some(tag), &upper)
}

/// Appends `value` to the array at `pointer` (created when missing).
fn push(
    cfg: &mut serde_json::Value,
    pointer: &str,
    value: serde_json::Value,
) -> Result<(), ImageError> {
    if cfg.pointer(pointer).is_none() {
        let (parent, key) = pointer
            .rsplit_once('/')
            .ok_or(ImageError::Internal("bad pointer"))?;
        let obj = if parent.is_empty() {
            Some(&mut *cfg)
        } else {
            cfg.pointer_mut(parent)
        };
        match obj.and_then(|o| o.as_object_mut()) {
            Some(o) => {
                o.insert(key.to_string(), serde_json::json!([]));
            }
            None => {
                return Err(ImageError::Format(format!(
                    "base image config has no {parent}"
                )));
            }
        }
    }
    match cfg.pointer_mut(pointer).and_then(|v| v.as_array_mut()) {
        Some(a) => {
            a.push(value);
            Ok(())
        }
        None => Err(ImageError::Format(format!(
            "base image config: {pointer} is not a list"
        ))),
    }
}

/// A fresh workdir next to `upper` (same filesystem), removed by the caller.
fn sibling_workdir(upper: &Path) -> Result<PathBuf, ImageError> {
    let parent = upper.parent().unwrap_or(Path::new("/"));
    let name = upper
        .file_name()
        .map_or("upper".into(), |n| n.to_string_lossy().into_owned());
    let work = parent.join(format!(".{name}.commit-work-{}", std::process::id()));
    std::fs::create_dir(&work)
        .map_err(|e| ImageError::Store(format!("{}: {e}", work.display())))?;
    Ok(work)
}

/// Writes the layer tar of `upper`'s changes, as seen through the merged view at `merged`,
/// to `out`; returns its digest (the diff id) and entry count.
fn write_diff(
    upper: &Path,
    merged: &Path,
    out: &Path,
) -> Result<(crate::image::digest::Digest, u64), ImageError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| ImageError::Store(format!("{}: {e}", p.display()))
    };
    let udir = sys::fs::open_host_dir(upper).map_err(io(upper))?;
    let mdir = sys::fs::open_host_dir(merged).map_err(io(merged))?;
    let file = std::fs::File::create(out).map_err(io(out))?;
    let bar = Progress::new("new layer".into(), None);
    let counting = CountingWriter::new(BufWriter::new(file), bar);
    let mut w = LayerWriter::new(HashingWriter::new(counting));
    walk(&mut w, udir.as_fd(), mdir.as_fd(), Path::new(""))?;
    let entries = w.entries;
    let hashing = w.finish()?;
    let (digest, _, counting) = hashing.finish();
    let (mut inner, bar) = counting.into_parts();
    inner.flush().map_err(io(out))?;
    bar.finish(&format!(" {} ({entries} entries)", digest.short()));
    inner.get_ref().sync_all().map_err(io(out))?;
    Ok((digest, entries))
}

/// The changes below upper directory `udir` (merged counterpart `mdir`) under `prefix`.
fn walk<W: Write>(
    w: &mut LayerWriter<W>,
    udir: BorrowedFd<'_>,
    mdir: BorrowedFd<'_>,
    prefix: &Path,
) -> Result<(), ImageError> {
    for name in sorted_names(udir, prefix)? {
        let bytes = name.as_encoded_bytes();
        if bytes == whiteout::OPAQUE_MARKER {
            continue; // written with its directory
        }
        if let Some(hidden) = whiteout::hidden_by_wh(&name) {
            w.add_whiteout(prefix, hidden)?; // a rootless upper's own .wh. whiteout
            continue;
        }
        let path = join(prefix, &name);
        let st = sys::fs::stat_name(udir, &name)
            .map_err(|e| ImageError::Store(format!("{}: {e}", path.display())))?;
        let is_whiteout = whiteout::is_chardev_whiteout(&st)
            || (whiteout::may_be_xattr_whiteout(&st)
                && whiteout::is_xattr_whiteout(udir, &name).unwrap_or(false));
        let shown = sys::fs::stat_name(mdir, &name).ok();
        if is_whiteout || shown.is_none() {
            if shown.is_none() {
                w.add_whiteout(prefix, &name)?;
            }
            continue;
        }
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            w.add(mdir, &name, &path)?;
            continue;
        }
        let sub_u = sys::fs::open_dir_path(udir, &name)
            .map_err(|e| ImageError::Store(format!("{}: {e}", path.display())))?;
        let markers = whiteout::dir_markers(sub_u.as_fd())
            .map_err(|e| ImageError::Store(format!("{}: {e}", path.display())))?;
        let redirected = whiteout::redirect(sub_u.as_fd()).ok().flatten().is_some();
        let kind = w.add(mdir, &name, &path)?;
        if kind != FileType::Directory {
            continue;
        }
        let sub_m = sys::fs::open_dir_path(mdir, &name)
            .map_err(|e| ImageError::Store(format!("{}: {e}", path.display())))?;
        if redirected {
            // Its lower content comes from where it was renamed from: write all of it.
            w.add_opaque(&path)?;
            w.add_tree(sub_m.as_fd(), &path)?;
            continue;
        }
        if markers.opaque {
            w.add_opaque(&path)?;
        }
        walk(w, sub_u.as_fd(), sub_m.as_fd(), &path)?;
    }
    Ok(())
}

/// Now as RFC 3339 (UTC), without a date crate.
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let s = rfc3339_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
