//! `/proc/self/mountinfo`, read for one purpose: to find a layer directory that sits on an
//! idmapped mount and reach the same directory through a plain (not idmapped) mount of the
//! same filesystem.
//!
//! Why: podman 4.3 (containers-storage 1.45) run as root with a mount program and `--uidmap`
//! hands over lower layers on idmapped mounts already shifted to the container's ids *and*
//! passes `uidmapping=`/`gidmapping=` for the same shift. Read through the idmapped mount, every
//! owner would be shifted twice and show as the overflow id (fuse-overlayfs 1.10 fails the same
//! way). Read through a plain mount, the ids are the ones on disk, which is what the mapping
//! options are written for.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags};

/// The mount-option word the kernel shows for an idmapped mount (`show_mnt_opts`).
const IDMAPPED: &[u8] = b"idmapped";

/// One line of mountinfo, the fields we need (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Mount id (field 1), what `statx(STATX_MNT_ID)` reports for files on this mount.
    pub id: u64,
    /// `major:minor` of the filesystem (field 3): mounts of one filesystem share it.
    pub dev: (u32, u32),
    /// The directory of the filesystem that is the root of this mount (field 4).
    pub root: PathBuf,
    /// Where it is mounted, relative to our root (field 5).
    pub mount_point: PathBuf,
    /// `idmapped` is among the per-mount options (field 6).
    pub idmapped: bool,
}

/// Why a layer on an idmapped mount could not be reached through a plain mount.
#[derive(Debug, thiserror::Error)]
pub enum UnmapError {
    /// `statx(STATX_MNT_ID)` failed.
    #[error("cannot tell its mount (statx STATX_MNT_ID): {0}")]
    MountId(io::Error),
    /// The layer directory could not be `fstat`ed.
    #[error("cannot stat it: {0}")]
    Stat(io::Error),
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Read(io::Error),
    /// The layer's mount is not in mountinfo, or the layer path is not under its mount point.
    #[error("its mount {0} is not in /proc/self/mountinfo")]
    NotListed(u64),
    /// No plain mount of the filesystem reaches the same directory.
    #[error("no mount of the same filesystem without idmapping reaches it")]
    NoPlainMount,
}

/// Decodes the octal escapes (`\040` for a space, `\011`, `\012`, `\134`) the kernel writes
/// in mountinfo paths (`mangle` in fs/proc_namespace.c). Anything else is kept as is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let code = field.get(i + 1..i + 4).and_then(octal_byte);
        match (field[i], code) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Three octal digits as one byte, if they are that.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut v: u32 = 0;
    for d in digits {
        if !(b'0'..=b'7').contains(d) {
            return None;
        }
        v = v * 8 + u32::from(d - b'0');
    }
    u8::try_from(v).ok()
}

/// Parses one mountinfo line; `None` for a line that does not have the expected shape.
pub fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|b| *b == b' ').filter(|f| !f.is_empty());
    let id = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let _parent = fields.next()?;
    let (major, minor) = std::str::from_utf8(fields.next()?).ok()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let root = path_field(fields.next()?);
    let mount_point = path_field(fields.next()?);
    let idmapped = fields.next()?.split(|b| *b == b',').any(|o| o == IDMAPPED);
    Some(Mount {
        id,
        dev,
        root,
        mount_point,
        idmapped,
    })
}

/// A path field, unescaped.
fn path_field(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Parses a whole mountinfo text, skipping malformed lines.
pub fn parse(text: &[u8]) -> Vec<Mount> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

/// Where `path`, a path under the idmapped mount `mapped`, can be reached through the plain
/// mounts of the same filesystem: best candidate first (the mount whose root is nearest to
/// the directory, so the path crosses as little as possible).
pub fn plain_aliases(mounts: &[Mount], mapped: &Mount, path: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rest) = path.strip_prefix(&mapped.mount_point) else {
        return Vec::new();
    };
    let in_fs = mapped.root.join(rest);
    let mut found: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.dev == mapped.dev && !m.idmapped && in_fs.starts_with(&m.root))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.root.components().count()));
    found
        .into_iter()
        .filter_map(|m| {
            let sub = in_fs.strip_prefix(&m.root).ok()?;
            Some((m.id, m.mount_point.join(sub)))
        })
        .collect()
}

/// The mount id of the mount `fd` is on; `None` where the kernel does not tell (before 5.8,
/// which also means before idmapped mounts, 5.12).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    match rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID) {
        Ok(stx) if stx.stx_mask & StatxFlags::MNT_ID.bits() != 0 => Ok(Some(stx.stx_mnt_id)),
        Ok(_) | Err(rustix::io::Errno::NOSYS) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// If the directory `dir` (opened from the host path `path`) is on an idmapped mount, opens
/// the same directory through a plain mount of its filesystem; `Ok(None)` if it is not on an
/// idmapped mount. A replacement is accepted only if it is the same inode (`st_dev`,
/// `st_ino`) on the mount it was looked for on; otherwise this fails with
/// [`UnmapError::NoPlainMount`].
pub fn open_unmapped(dir: BorrowedFd<'_>, path: &Path) -> Result<Option<OwnedFd>, UnmapError> {
    let Some(id) = mount_id(dir).map_err(UnmapError::MountId)? else {
        return Ok(None);
    };
    let text = std::fs::read("/proc/self/mountinfo").map_err(UnmapError::Read)?;
    let mounts = parse(&text);
    let mapped = mounts
        .iter()
        .find(|m| m.id == id)
        .ok_or(UnmapError::NotListed(id))?;
    if !mapped.idmapped {
        return Ok(None);
    }
    if !path.starts_with(&mapped.mount_point) {
        return Err(UnmapError::NotListed(id));
    }
    let want = super::fs::stat_fd(dir).map_err(UnmapError::Stat)?;
    for (plain_id, alias) in plain_aliases(&mounts, mapped, path) {
        let Ok(fd) = super::fs::open_host_dir(&alias) else {
            continue;
        };
        let same = super::fs::stat_fd(fd.as_fd())
            .is_ok_and(|st| st.st_dev == want.st_dev && st.st_ino == want.st_ino);
        if same && mount_id(fd.as_fd()).is_ok_and(|m| m == Some(plain_id)) {
            return Ok(Some(fd));
        }
    }
    Err(UnmapError::NoPlainMount)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 254:0 /var/tmp/s/graph/overlay /var/tmp/s/graph/overlay rw,relatime - ext4 /dev/vda rw
43 27 0:39 / /var/tmp/s/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=64000k
44 42 254:0 /var/tmp/s/graph/overlay /var/tmp/s/graph/overlay/C/mapped/0 rw,relatime,idmapped - ext4 /dev/vda rw
";

    #[test]
    fn parses_podman_mountinfo() {
        let m = parse(SAMPLE.as_bytes());
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[3],
            Mount {
                id: 44,
                dev: (254, 0),
                root: "/var/tmp/s/graph/overlay".into(),
                mount_point: "/var/tmp/s/graph/overlay/C/mapped/0".into(),
                idmapped: true,
            }
        );
        assert!(!m[0].idmapped && !m[1].idmapped);
        assert_eq!(m[2].dev, (0, 39));
    }

    #[test]
    fn optional_fields_and_escapes() {
        let line = br"36 35 98:0 /a\040b /mnt/with\040space\011tab rw,noatime master:1 - ext3 /dev/root rw";
        let m = parse_line(line).unwrap();
        assert_eq!(m.root, PathBuf::from("/a b"));
        assert_eq!(m.mount_point, PathBuf::from("/mnt/with space\ttab"));
        assert!(!m.idmapped);
        // `idmapped` only counts in the per-mount options, as a whole word.
        let fs_opt = b"1 0 8:1 / / rw,relatime - ext4 /dev/sda idmapped";
        assert!(!parse_line(fs_opt).unwrap().idmapped);
        let prefix = b"1 0 8:1 / / rw,idmappedx - ext4 /dev/sda rw";
        assert!(!parse_line(prefix).unwrap().idmapped);
    }

    #[test]
    fn unescape_keeps_what_is_not_an_escape() {
        assert_eq!(unescape(br"a\134b"), b"a\\b");
        assert_eq!(unescape(br"a\x40"), br"a\x40");
        assert_eq!(unescape(br"end\04"), br"end\04");
        assert_eq!(unescape(br"\777"), br"\777");
        assert_eq!(unescape(br"\012"), b"\n");
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_line(b"").is_none());
        assert!(parse_line(b"x 1 8:1 / / rw").is_none());
        assert!(parse_line(b"1 0 8-1 / / rw").is_none());
        assert!(parse_line(b"1 0 8:1 / /").is_none());
    }

    #[test]
    fn aliases_prefer_the_nearest_root() {
        let m = parse(SAMPLE.as_bytes());
        let mapped = &m[3];
        let got = plain_aliases(
            &m,
            mapped,
            Path::new("/var/tmp/s/graph/overlay/C/mapped/0/L1/diff"),
        );
        assert_eq!(
            got,
            vec![
                (42, PathBuf::from("/var/tmp/s/graph/overlay/L1/diff")),
                (27, PathBuf::from("/var/tmp/s/graph/overlay/L1/diff")),
            ]
        );
    }

    #[test]
    fn aliases_need_the_same_filesystem_and_a_containing_root() {
        let text = "\
1 0 8:1 /sub / rw - ext4 /dev/sda rw
2 1 8:2 / /other rw - ext4 /dev/sdb rw
3 1 8:1 /sub/x /idm rw,idmapped - ext4 /dev/sda rw
4 1 8:1 /elsewhere /e rw - ext4 /dev/sda rw
5 1 8:1 /sub/x /idm2 rw,idmapped - ext4 /dev/sda rw
";
        let m = parse(text.as_bytes());
        let got = plain_aliases(&m, &m[2], Path::new("/idm/y"));
        assert_eq!(got, vec![(1, PathBuf::from("/x/y"))]);
        assert!(plain_aliases(&m, &m[2], Path::new("/not/under")).is_empty());
    }
}
