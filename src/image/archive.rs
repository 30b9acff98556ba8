//! Writing layer tars from a directory tree: entries with the owners, modes, times and
//! extended attributes the directory shows, hard links as link entries, whiteouts and opaque
//! markers in the OCI format (`.wh.NAME`, `.wh..wh..opq`). Used by `commit` (from a
//! container's merged view) and `export` (from unpacked layers). Objects are opened
//! fd-relative and never through a symlink.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, OFlags};
use sha2::{Digest as _, Sha256};

use crate::image::ImageError;
use crate::image::digest::Digest;
use crate::ovl::{override_stat, whiteout};
use crate::sys;

/// Passes writes through, hashing and counting them (a layer's digest and size).
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and size of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        let hex = hex::encode(self.hasher.finalize());
        let digest = Digest::parse(&format!("sha256:{hex}")).unwrap_or_else(|_| Digest::of(b""));
        (digest, self.count, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A layer tar being written.
pub struct LayerWriter<W: Write> {
    tar: tar::Builder<W>,
    /// (st_dev, st_ino) of objects with several links -> the path they were first added as.
    links: HashMap<(u64, u64), PathBuf>,
    /// Entries written.
    pub entries: u64,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> ImageError + '_ {
    move |e| ImageError::Store(format!("archiving {}: {e}", path.display()))
}

impl<W: Write> LayerWriter<W> {
    /// A writer on `out`.
    pub fn new(out: W) -> LayerWriter<W> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Complete);
        tar.follow_symlinks(false);
        LayerWriter {
            tar,
            links: HashMap::new(),
            entries: 0,
        }
    }

    /// Adds `name` of directory `dir` as `path`, with what `dir` shows of it (for a regular
    /// file, its content). Returns its type.
    pub fn add(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<FileType, ImageError> {
        let err = io_err(path);
        let st = sys::fs::stat_name(dir, name).map_err(&err)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let mut h = tar::Header::new_gnu();
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        h.set_size(0);
        if kind != FileType::Directory && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)).cloned() {
                h.set_entry_type(tar::EntryType::Link);
                self.tar.append_link(&mut h, path, &first).map_err(&err)?;
                self.entries += 1;
                return Ok(kind);
            }
            self.links
                .insert((st.st_dev, st.st_ino), path.to_path_buf());
        }
        if kind != FileType::Symlink {
            self.add_xattrs(dir, name, path)?;
        }
        match kind {
            FileType::Directory => {
                h.set_entry_type(tar::EntryType::Directory);
                self.tar
                    .append_data(&mut h, path, io::empty())
                    .map_err(&err)?;
            }
            FileType::RegularFile => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(st.st_size as u64);
                let fd = sys::fs::open_beneath(dir, name, OFlags::RDONLY).map_err(&err)?;
                let file = std::fs::File::from(fd);
                // A file that changes size while archived would corrupt the stream: take
                // exactly the size in the header.
                let mut data = io::Read::take(file, st.st_size as u64);
                self.tar
                    .append_data(&mut h, path, &mut data)
                    .map_err(&err)?;
            }
            FileType::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                let target = sys::fs::read_link(dir, name).map_err(&err)?;
                self.tar
                    .append_link(&mut h, path, OsStr::from_bytes(&target))
                    .map_err(&err)?;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                h.set_entry_type(match kind {
                    FileType::CharacterDevice => tar::EntryType::Char,
                    FileType::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                h.set_device_major(rustix::fs::major(st.st_rdev))
                    .map_err(&err)?;
                h.set_device_minor(rustix::fs::minor(st.st_rdev))
                    .map_err(&err)?;
                self.tar
                    .append_data(&mut h, path, io::empty())
                    .map_err(&err)?;
            }
            _ => return Ok(kind), // sockets are not archived (tar has no type for them)
        }
        self.entries += 1;
        Ok(kind)
    }

    /// PAX `SCHILY.xattr.*` records for the object's attributes, overlay-private and
    /// owner-override ones left out.
    fn add_xattrs(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
    ) -> Result<(), ImageError> {
        let err = io_err(path);
        let obj = sys::fs::open_path(dir, name).map_err(&err)?;
        let names = match sys::fs::list_xattr(obj.as_fd()) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        for n in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if whiteout::is_private_xattr(n) || override_stat::is_override_name(n) {
                continue;
            }
            if let Ok(Some(v)) = sys::fs::get_xattr(obj.as_fd(), OsStr::from_bytes(n)) {
                records.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(n)), v));
            }
        }
        if !records.is_empty() {
            self.tar
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(&err)?;
        }
        Ok(())
    }

    /// A whiteout for `path` (`DIR/.wh.NAME`).
    pub fn add_whiteout(&mut self, parent: &Path, name: &OsStr) -> Result<(), ImageError> {
        let mut wh = OsString::from(".wh.");
        wh.push(name);
        self.add_marker(&join(parent, &wh))
    }

    /// The opaque marker of directory `dir` (`DIR/.wh..wh..opq`).
    pub fn add_opaque(&mut self, dir: &Path) -> Result<(), ImageError> {
        self.add_marker(&join(dir, OsStr::from_bytes(whiteout::OPAQUE_MARKER)))
    }

    fn add_marker(&mut self, path: &Path) -> Result<(), ImageError> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h.set_mtime(0);
        self.tar
            .append_data(&mut h, path, io::empty())
            .map_err(io_err(path))?;
        self.entries += 1;
        Ok(())
    }

    /// Adds everything below directory `dir` (not `dir` itself) under `prefix`, sorted by
    /// name so the same tree gives the same tar.
    pub fn add_tree(&mut self, dir: BorrowedFd<'_>, prefix: &Path) -> Result<(), ImageError> {
        for name in sorted_names(dir, prefix)? {
            let path = join(prefix, &name);
            if self.add(dir, &name, &path)? == FileType::Directory {
                let sub = sys::fs::open_dir_path(dir, &name).map_err(io_err(&path))?;
                self.add_tree(sub.as_fd(), &path)?;
            }
        }
        Ok(())
    }

    /// Ends the archive and returns the writer.
    pub fn finish(self) -> Result<W, ImageError> {
        self.tar
            .into_inner()
            .map_err(|e| ImageError::Store(format!("finishing the layer: {e}")))
    }
}

/// The names in `dir`, sorted.
pub fn sorted_names(dir: BorrowedFd<'_>, what: &Path) -> Result<Vec<OsString>, ImageError> {
    let mut names: Vec<OsString> = sys::fs::read_dir(dir)
        .map_err(io_err(what))?
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    Ok(names)
}

/// `prefix/name` (just `name` at the top).
pub fn join(prefix: &Path, name: &OsStr) -> PathBuf {
    prefix.join(name)
}
