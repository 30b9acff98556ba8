//! `-o` option parsing: the fuse-overlayfs option language turned into a validated [`Config`].
//!
//! Mirrors kernel `fs/overlayfs/params.c` (and fuse-overlayfs's `ovl_opts`). Parsing is pure;
//! checks that touch the filesystem live in [`crate::ovl::layer`].

use crate::ovl::override_stat::OverrideXattr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::SetupError;
use crate::ovl::idmap::{self, IdMap};

/// The kernel's `OVL_MAX_STACK`: the most lower layers one mount may have.
pub const MAX_LOWER_LAYERS: usize = 500;

/// fuse-overlayfs's default entry/attribute timeout (seconds): the layers only change through
/// us, so the kernel may cache for as long as it likes.
const DEFAULT_TIMEOUT_SECS: f64 = 1_000_000_000.0;

/// Default `busy_poll=` window (µs): long enough to bridge the gaps of a program walking a
/// tree, short enough that polling stops soon after it.
const DEFAULT_BUSY_POLL_MICROS: u64 = 1000;

/// Workers per CPU queue for a bare `io_uring` option.
pub const DEFAULT_IO_URING_WORKERS: usize = 2;
/// Most workers per CPU queue `io_uring=` accepts.
pub const MAX_IO_URING_WORKERS: usize = 16;
/// Largest `busy_poll=` window (µs); longer ones only burn CPU.
const MAX_BUSY_POLL_MICROS: u64 = 1_000_000;

/// Everything `-o` can say, after validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// Lower layers, top first (the leftmost in `lowerdir=`).
    pub lowerdirs: Vec<PathBuf>,
    /// The writable layer; `None` makes the mount read-only.
    pub upperdir: Option<PathBuf>,
    /// Scratch space for atomic operations, on the upper's filesystem.
    pub workdir: Option<PathBuf>,
    /// Kernel entry and attribute cache lifetime (`timeout=`).
    pub timeout: Duration,
    /// How long one reader keeps polling `/dev/fuse` without sleeping after the last
    /// request (`busy_poll=MICROS`; zero turns it off): see [`crate::fuse::busy_poll`].
    pub busy_poll: Duration,
    /// Serve requests through FUSE over io_uring with this many workers per CPU when the
    /// kernel allows it (`io_uring[=WORKERS]`; 0, the default, reads `/dev/fuse`).
    pub io_uring: usize,
    /// Report `st_nlink = 1` for every directory (`static_nlink`).
    pub static_nlink: bool,
    /// Turn extended attributes off (`noxattrs=1`).
    pub noxattrs: bool,
    /// Honour fsync (`fsync=0` / `volatile` turn it into a no-op).
    pub fsync: bool,
    /// Use the kernel writeback cache (`writeback=`), for the write side.
    pub writeback: bool,
    /// Mount read-only even with an upper layer (`ro`).
    pub read_only: bool,
    /// Kernel-level mount options.
    pub fuse: FuseOptions,
    /// Options fuse-overlayfs accepts that stratafs does not apply (yet); each is reported as
    /// `unknown argument ignored: X`, never fatal.
    pub ignored: Vec<String>,
    /// `-o debug`.
    pub debug: bool,
    /// Directory redirects (`redirect_dir=`): whether renaming a lower or merged directory
    /// writes a redirect (`on`, the default here) or fails with EXDEV as with the kernel's
    /// default (`follow`, `off`), and whether existing redirects are followed (all but
    /// `nofollow`).
    pub redirect_dir: RedirectDir,
    /// Metadata-only copy-up (`metacopy=on`, the default here): chmod, chown, utimes,
    /// xattr changes and renames of a lower regular file copy its attributes up, not its
    /// data; the data follows on the first open for write.
    pub metacopy: bool,
    /// Inode index (`index=on`, the default here; the kernel's default is off): a lower
    /// hard link copied up through one name is recorded in `workdir/index` under its origin,
    /// so that its other names keep showing the same (copied-up) inode, in this mount and
    /// the next ones.
    pub index: bool,
    /// FUSE passthrough (`passthrough=on`, the default): the kernel reads and writes open
    /// files' real files itself where it allows it (privileged mounts on Linux 6.9+); off
    /// with `passthrough=off`, and with `fsync=0`/`volatile` (passthrough would bypass them).
    pub passthrough: bool,
    /// POSIX ACLs (`noacl` turns them off, as in fuse-overlayfs): the kernel checks and caches
    /// them, and new objects inherit default ACLs.
    pub acl: bool,
    /// `index=` was given (not just the default).
    pub index_explicit: bool,
    /// Owner translation (`uidmapping=`, `gidmapping=`, `squash_to_*`; see [`IdMap`]).
    pub ids: IdMap,
    /// `xattr_permissions=1|2`: the upper layer keeps owners and modes in this attribute
    /// instead of the inode (see [`crate::ovl::override_stat`]).
    pub xattr_permissions: Option<OverrideXattr>,
    /// `squash_to_root`: both owners show as 0 unless `squash_to_uid=`/`squash_to_gid=` say
    /// otherwise (resolved at the end of parsing, as fuse-overlayfs gives those precedence).
    squash_to_root: bool,
}

/// The kernel's `redirect_dir=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectDir {
    /// Create and follow redirects: any directory can be renamed.
    On,
    /// Follow existing redirects, never create one (directory renames give EXDEV).
    Follow,
    /// Like `follow` (the kernel's `redirect_always_follow` default).
    Off,
    /// Neither create nor follow.
    NoFollow,
}

impl RedirectDir {
    /// Whether renaming a lower or merged directory may write a redirect.
    pub fn create(self) -> bool {
        self == RedirectDir::On
    }

    /// Whether lookups follow redirects found in layers.
    pub fn follow(self) -> bool {
        self != RedirectDir::NoFollow
    }
}

/// Options handed to the FUSE kernel module.
#[derive(Debug, Clone, Default)]
pub struct FuseOptions {
    /// Let every user in (`allow_other`).
    pub allow_other: bool,
    /// Let root in as well as the owner (`allow_root`).
    pub allow_root: bool,
    /// Honour setuid bits (`suid`/`nosuid`); default: on for root, like fuse-overlayfs.
    pub suid: Option<bool>,
    /// Honour device nodes (`dev`/`nodev`); default off, as libfuse.
    pub dev: Option<bool>,
    /// Allow execution (`exec`/`noexec`).
    pub exec: Option<bool>,
    /// Update access times (`atime`/`noatime`); default `noatime`, as fuse-overlayfs.
    pub atime: Option<bool>,
    /// `dirsync`, `sync`.
    pub dirsync: bool,
    /// `sync`.
    pub sync: bool,
    /// The source shown in /proc/mounts (`fsname=`).
    pub fsname: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            timeout: Duration::from_secs_f64(DEFAULT_TIMEOUT_SECS),
            busy_poll: Duration::from_micros(DEFAULT_BUSY_POLL_MICROS),
            io_uring: 0,
            static_nlink: false,
            noxattrs: false,
            fsync: true,
            writeback: true,
            read_only: false,
            fuse: FuseOptions::default(),
            ignored: Vec::new(),
            debug: false,
            redirect_dir: RedirectDir::On,
            metacopy: true,
            passthrough: true,
            acl: true,
            index: true,
            index_explicit: false,
            ids: IdMap::default(),
            xattr_permissions: None,
            squash_to_root: false,
        }
    }
}

impl Config {
    /// Parses every `-o` argument (in order; later options override earlier ones).
    pub fn parse<S: AsRef<str>>(option_args: &[S]) -> Result<Config, SetupError> {
        let mut cfg = Config::default();
        for arg in option_args {
            for opt in split_options(arg.as_ref()) {
                cfg.apply(&opt)?;
            }
        }
        if cfg.lowerdirs.is_empty() {
            return Err(SetupError::NoLowerdir);
        }
        if cfg.lowerdirs.len() > MAX_LOWER_LAYERS {
            return Err(SetupError::TooManyLayers(cfg.lowerdirs.len()));
        }
        if let (Some(upper), None) = (&cfg.upperdir, &cfg.workdir) {
            return Err(SetupError::MissingWorkdir(upper.clone()));
        }
        if cfg.redirect_dir == RedirectDir::NoFollow && cfg.index {
            // The index needs to follow redirects (kernel: an explicit index=on conflicts,
            // a default one is turned off).
            if cfg.index_explicit {
                return Err(SetupError::BadOption {
                    option: "index=on".into(),
                    reason: "conflicts with redirect_dir=nofollow".into(),
                });
            }
            cfg.index = false;
        }
        if cfg.squash_to_root {
            cfg.ids.uids.squash.get_or_insert(0);
            cfg.ids.gids.squash.get_or_insert(0);
        }
        cfg.ids.uids.overflow = idmap::kernel_overflow_id("uid");
        cfg.ids.gids.overflow = idmap::kernel_overflow_id("gid");
        Ok(cfg)
    }

    /// Whether writes are refused with EROFS.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.upperdir.is_none()
    }

    fn apply(&mut self, opt: &str) -> Result<(), SetupError> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let bad = |reason: &str| SetupError::BadOption {
            option: opt.to_string(),
            reason: reason.to_string(),
        };
        let flag = |v: Option<&str>| -> Result<bool, SetupError> {
            match v {
                None | Some("1") | Some("on") | Some("true") | Some("yes") => Ok(true),
                Some("0") | Some("off") | Some("false") | Some("no") => Ok(false),
                Some(_) => Err(bad("expected 0 or 1")),
            }
        };
        match key {
            "lowerdir" => {
                let v = value.ok_or(SetupError::NoLowerdir)?;
                if v.is_empty() {
                    return Err(SetupError::NoLowerdir);
                }
                self.lowerdirs = split_lowerdir(v)?;
            }
            "upperdir" => {
                self.upperdir = Some(unescape(value.ok_or_else(|| bad("needs a path"))?).into())
            }
            "workdir" => {
                self.workdir = Some(unescape(value.ok_or_else(|| bad("needs a path"))?).into())
            }
            "timeout" => {
                let secs: f64 = value
                    .ok_or_else(|| bad("needs a number of seconds"))?
                    .parse()
                    .map_err(|_| bad("expected a number of seconds"))?;
                if !(secs >= 0.0 && secs.is_finite()) {
                    return Err(bad("expected a non-negative number of seconds"));
                }
                self.timeout = Duration::from_secs_f64(secs.min(DEFAULT_TIMEOUT_SECS));
            }
            "busy_poll" => {
                let micros: u64 = value
                    .ok_or_else(|| bad("needs a number of microseconds"))?
                    .parse()
                    .map_err(|_| bad("expected a number of microseconds"))?;
                if micros > MAX_BUSY_POLL_MICROS {
                    return Err(bad("at most 1000000 microseconds"));
                }
                self.busy_poll = Duration::from_micros(micros);
            }
            "io_uring" => {
                self.io_uring = match value {
                    None => DEFAULT_IO_URING_WORKERS,
                    Some(v) => v
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_IO_URING_WORKERS)
                        .ok_or_else(|| bad("expected a number of workers per CPU, 0 to 16"))?,
                };
            }
            "static_nlink" => self.static_nlink = flag(value)?,
            "noxattrs" => self.noxattrs = flag(value)?,
            "fsync" | "sync" if value.is_some() => self.fsync = flag(value)?,
            "sync" => self.fuse.sync = true,
            "volatile" => self.fsync = false,
            "writeback" => self.writeback = flag(value)?,
            "threaded" | "fast_ino" | "fast_ino_check" => {
                // Always multi-threaded, and inode numbers are always exact: nothing to change.
                flag(value)?;
            }
            "xino" => match value {
                Some("off") | Some("auto") | Some("on") => {}
                _ => return Err(bad("expected off, auto or on")),
            },
            "metacopy" => self.metacopy = flag(value)?,
            "passthrough" => self.passthrough = flag(value)?,
            "noacl" => self.acl = false,
            "acl" => self.acl = true,
            "index" => {
                self.index = flag(value)?;
                self.index_explicit = true;
            }
            "redirect_dir" => {
                self.redirect_dir = match value {
                    Some("on") => RedirectDir::On,
                    Some("follow") => RedirectDir::Follow,
                    Some("off") => RedirectDir::Off,
                    Some("nofollow") => RedirectDir::NoFollow,
                    _ => return Err(bad("expected on, follow, off or nofollow")),
                }
            }
            // SELinux label: accepted and dropped, as fuse-overlayfs does.
            "context" | "fscontext" | "defcontext" | "rootcontext" => {}
            "debug" => self.debug = true,
            "ro" => self.read_only = true,
            "rw" => self.read_only = false,
            "allow_other" => self.fuse.allow_other = true,
            "allow_root" => self.fuse.allow_root = true,
            // We always ask the kernel to check permissions (as fuse-overlayfs does).
            "default_permissions" => {}
            "suid" => self.fuse.suid = Some(true),
            "nosuid" => self.fuse.suid = Some(false),
            "dev" => self.fuse.dev = Some(true),
            "nodev" => self.fuse.dev = Some(false),
            "exec" => self.fuse.exec = Some(true),
            "noexec" => self.fuse.exec = Some(false),
            "atime" | "strictatime" | "relatime" => self.fuse.atime = Some(true),
            "noatime" => self.fuse.atime = Some(false),
            "diratime" | "nodiratime" | "lazytime" | "nolazytime" | "auto" | "noauto" | "user"
            | "nouser" | "users" | "_netdev" | "nofail" | "defaults" | "async" => {}
            "dirsync" => self.fuse.dirsync = true,
            "fsname" => self.fuse.fsname = value.map(str::to_string),
            "uidmapping" | "gidmapping" => {
                let ranges =
                    idmap::parse_ranges(value.unwrap_or("")).map_err(|e| bad(&e.to_string()))?;
                match key {
                    "uidmapping" => self.ids.uids.ranges = ranges,
                    _ => self.ids.gids.ranges = ranges,
                }
            }
            "squash_to_root" => self.squash_to_root = flag(value)?,
            "squash_to_uid" | "squash_to_gid" => {
                let id: u32 = value
                    .ok_or_else(|| bad("needs an id"))?
                    .parse()
                    .map_err(|_| bad("expected a numeric id"))?;
                match key {
                    "squash_to_uid" => self.ids.uids.squash = Some(id),
                    _ => self.ids.gids.squash = Some(id),
                }
            }
            "xattr_permissions" => {
                let n: u8 = value
                    .ok_or_else(|| bad("needs 0, 1 or 2"))?
                    .parse()
                    .map_err(|_| bad("expected 0, 1 or 2"))?;
                if n > 2 {
                    return Err(bad("expected 0, 1 or 2"));
                }
                self.xattr_permissions = OverrideXattr::from_option(n);
            }
            "" => {}
            // Everything else fuse-overlayfs accepts but we do not apply yet
            // (plugins=, ...) and anything unknown.
            _ => self.ignored.push(opt.to_string()),
        }
        Ok(())
    }
}

/// Splits one `-o` argument on commas. `\,` is a literal comma, commas inside double quotes
/// do not split (SELinux contexts), other backslash escapes are kept for the option's own
/// parser (`\:` in `lowerdir=`).
pub fn split_options(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = arg.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(',') => cur.push(','),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.retain(|s| !s.is_empty());
    out
}

/// Splits `lowerdir=` on unescaped colons; `\:` is a colon in a path, `\\` a backslash.
pub fn split_lowerdir(value: &str) -> Result<Vec<PathBuf>, SetupError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ':' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    if out.iter().any(String::is_empty) {
        return Err(SetupError::EmptyLayer(value.to_string()));
    }
    Ok(out.into_iter().map(PathBuf::from).collect())
}

/// `lowerdir=` for `layers` (top first): `:` separates layers, so colons and backslashes in
/// a path are escaped with a backslash (what the parser above undoes).
pub fn lowerdir_value(layers: &[PathBuf]) -> String {
    layers
        .iter()
        .map(|p| {
            p.to_string_lossy()
                .replace('\\', "\\\\")
                .replace(':', "\\:")
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// Removes backslash escapes from a single path (`upperdir=`, `workdir=`).
fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().unwrap_or('\\'));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether option `opt` (after a valid lowerdir) is refused as a bad option.
    fn refused(opt: &str) -> bool {
        matches!(
            Config::parse(&[format!("lowerdir=/l,{opt}")]),
            Err(SetupError::BadOption { .. })
        )
    }

    #[test]
    fn lowerdir_value_round_trips() {
        let layers = vec![
            PathBuf::from("/a:b"),
            PathBuf::from("/c\\d"),
            PathBuf::from("/e"),
        ];
        assert_eq!(split_lowerdir(&lowerdir_value(&layers)).ok(), Some(layers));
    }

    #[test]
    fn split_respects_escapes_and_quotes() {
        assert_eq!(
            split_options(r#"lowerdir=a\,b,context="x,y",ro"#),
            vec!["lowerdir=a,b", r#"context="x,y""#, "ro"]
        );
        assert_eq!(split_options(r"lowerdir=a\:b:c"), vec![r"lowerdir=a\:b:c"]);
    }

    #[test]
    fn lowerdir_colon_escape() {
        let v = split_lowerdir(r"/a\:b:/c").unwrap();
        assert_eq!(v, vec![PathBuf::from("/a:b"), PathBuf::from("/c")]);
        assert!(matches!(
            split_lowerdir("/a::/b"),
            Err(SetupError::EmptyLayer(_))
        ));
        assert!(matches!(
            split_lowerdir("/a:"),
            Err(SetupError::EmptyLayer(_))
        ));
    }

    #[test]
    fn full_command_line() {
        let cfg = Config::parse(&[
            "lowerdir=/l1:/l2,upperdir=/u",
            "workdir=/w,volatile,foo=bar",
        ])
        .unwrap();
        assert_eq!(cfg.lowerdirs.len(), 2);
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/u")));
        assert!(!cfg.fsync);
        assert_eq!(cfg.ignored, vec!["foo=bar"]);
        assert!(!cfg.is_read_only());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            Config::parse(&["upperdir=/u"]),
            Err(SetupError::NoLowerdir)
        ));
        assert!(matches!(
            Config::parse(&["lowerdir="]),
            Err(SetupError::NoLowerdir)
        ));
        assert!(matches!(
            Config::parse(&["lowerdir=/l,upperdir=/u"]),
            Err(SetupError::MissingWorkdir(_))
        ));
        assert!(matches!(
            Config::parse(&["lowerdir=/l,redirect_dir=bogus"]),
            Err(SetupError::BadOption { .. })
        ));
        assert_eq!(
            Config::parse(&["lowerdir=/l,redirect_dir=off"])
                .unwrap()
                .redirect_dir,
            RedirectDir::Off
        );
        assert!(matches!(
            Config::parse(&["lowerdir=/l,timeout=-1"]),
            Err(SetupError::BadOption { .. })
        ));
        for bad in [
            "busy_poll",
            "busy_poll=-1",
            "busy_poll=1.5",
            "busy_poll=1000001",
        ] {
            assert!(refused(bad), "{bad}");
        }
        assert_eq!(
            Config::parse(&["lowerdir=/l,busy_poll=0"])
                .unwrap()
                .busy_poll,
            Duration::ZERO
        );
        for bad in ["io_uring=17", "io_uring=-1", "io_uring=x", "io_uring="] {
            assert!(refused(bad), "{bad}");
        }
        let workers = |opts: &str| {
            Config::parse(&[format!("lowerdir=/l{opts}")])
                .unwrap()
                .io_uring
        };
        assert_eq!(workers(""), 0);
        assert_eq!(workers(",io_uring"), DEFAULT_IO_URING_WORKERS);
        assert_eq!(workers(",io_uring=0"), 0);
        assert_eq!(workers(",io_uring=16"), 16);
        let many = (0..501)
            .map(|i| format!("/l{i}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(matches!(
            Config::parse(&[format!("lowerdir={many}")]),
            Err(SetupError::TooManyLayers(501))
        ));
    }

    #[test]
    fn later_options_win_and_ro_without_upper() {
        let cfg = Config::parse(&["lowerdir=/a", "lowerdir=/b"]).unwrap();
        assert_eq!(cfg.lowerdirs, vec![PathBuf::from("/b")]);
        assert!(cfg.is_read_only());
    }

    #[test]
    fn owner_translation_options() {
        let cfg = Config::parse(&[
            "lowerdir=/l,uidmapping=0:100:10:10:5000:1,squash_to_root,squash_to_uid=5",
        ])
        .unwrap();
        assert_eq!(cfg.ids.uids.ranges.len(), 2);
        assert_eq!(cfg.ids.uids.disk(5000), 10);
        assert_eq!(
            cfg.ids.uids.squash,
            Some(5),
            "squash_to_uid wins over squash_to_root"
        );
        assert_eq!(cfg.ids.gids.squash, Some(0));
        assert!(cfg.ignored.is_empty());
        for bad in [
            "uidmapping=0:1",
            "gidmapping=x:1:1",
            "squash_to_gid=root",
            "squash_to_uid",
        ] {
            assert!(refused(bad), "{bad}");
        }
    }
}
