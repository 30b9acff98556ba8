//! The `stratafs run` command line, checked completely before anything is created (STYLE.md
//! habit 12): a [`Spec`] is a configuration that is known to make sense.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use clap::{Parser, ValueEnum};

use crate::run::RunError;

/// Run a command in a container whose root filesystem is a stratafs union of the given layers
/// and a private copy-on-write upper layer.
#[derive(Debug, Parser)]
#[command(
    name = "stratafs run",
    bin_name = "stratafs run",
    after_help = "Exit status: the command's (128+N when killed by signal N); 125 when the launcher \
fails, 126 when the command cannot be executed, 127 when it is not found.\n\nExamples:\n  \
stratafs run --lower /layers/app --lower /layers/base -- sh -c 'echo hi > /tmp/x'\n  \
stratafs run -it --lower /layers/base sh\n  stratafs run --keep --lower /layers/base -v \
/srv/data:/data:ro -- ls /data"
)]
pub struct RunArgs {
    /// A read-only layer directory; repeat for more, top layer first (the order of
    /// lowerdir=).
    #[arg(
        long = "lower",
        value_name = "DIR",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub lowers: Vec<PathBuf>,

    /// Run an image from the store (`stratafs image import`): its layers are the lower
    /// layers, its Env, Entrypoint, Cmd, WorkingDir and User the defaults.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,

    /// Keep the container's changes in DIR (created if missing) instead of a temporary upper
    /// layer removed at exit. Its workdir is DIR's sibling `.NAME.work`.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,

    /// Keep the temporary upper layer at exit and print its path (to commit it as a layer).
    #[arg(long)]
    pub keep: bool,

    /// Bind HOST (a directory or file) at CTR in the container; `:ro` makes it read-only.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volumes: Vec<String>,

    /// Set K=V in the command's environment (`-e K` copies K from the caller's).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// Read K=V lines from FILE (blank lines and lines starting with # are skipped).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,

    /// Working directory of the command inside the container (created if missing).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,

    /// Run as USER (name from the container's /etc/passwd, or a number), optionally with
    /// GROUP (name or number).
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// Host name inside the container (default: the container's id).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Mount the container's root filesystem read-only (volumes keep their own mode).
    #[arg(long = "read-only")]
    pub read_only: bool,

    /// Give the command a pseudo-terminal (with -i: an interactive shell).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,

    /// Keep standard input open and connected to the command.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,

    /// Network: `none` (a private network namespace with only loopback) or `host`.
    #[arg(long = "net", value_enum, default_value_t = NetMode::None)]
    pub net: NetMode,

    /// Memory limit (bytes, or with a k/m/g suffix), through cgroup v2.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// CPU limit in CPUs (e.g. 0.5), through cgroup v2.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,

    /// Maximum number of processes, through cgroup v2.
    #[arg(long = "pids-limit", value_name = "N")]
    pub pids_limit: Option<u64>,

    /// State directory (temporary uppers live in ROOT/run, images in the store there).
    /// Default: /var/lib/stratafs as root, $XDG_DATA_HOME/stratafs (~/.local/share/stratafs)
    /// otherwise.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// The command and its arguments (with --image: after the image's Entrypoint, instead of
    /// its Cmd).
    #[arg(
        value_name = "CMD",
        required_unless_present = "image",
        trailing_var_arg = true
    )]
    pub command: Vec<OsString>,
}

/// `--net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetMode {
    /// A private network namespace with loopback up.
    None,
    /// The host's network.
    Host,
}

/// A `-v` volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Host side, canonical.
    pub host: PathBuf,
    /// Container side: absolute, without `.`/`..`.
    pub target: PathBuf,
    /// `:ro`.
    pub read_only: bool,
}

/// `--memory`, `--cpus`, `--pids-limit`, in cgroup v2 file syntax.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// `memory.max` value.
    pub memory: Option<u64>,
    /// `cpu.max` value ("QUOTA PERIOD").
    pub cpu_max: Option<String>,
    /// `pids.max` value.
    pub pids: Option<u64>,
}

impl Limits {
    /// Whether any limit was asked for.
    pub fn any(&self) -> bool {
        self.memory.is_some() || self.cpu_max.is_some() || self.pids.is_some()
    }
}

/// A validated `stratafs run` configuration.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Lower layers, top first, canonical.
    pub lowers: Vec<PathBuf>,
    /// `--upper`, as given (created at launch).
    pub upper: Option<PathBuf>,
    /// `--keep`.
    pub keep: bool,
    /// Volumes in the order given.
    pub volumes: Vec<Volume>,
    /// Environment given by `-e` and `--env-file` (later wins).
    pub env: Vec<(String, String)>,
    /// `-w`, absolute.
    pub workdir: Option<PathBuf>,
    /// `-u`, unresolved (names are looked up in the container's /etc/passwd).
    pub user: Option<(String, Option<String>)>,
    /// Host name.
    pub hostname: String,
    /// `--read-only`.
    pub read_only: bool,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub interactive: bool,
    /// `--net`.
    pub net: NetMode,
    /// cgroup limits.
    pub limits: Limits,
    /// State directory.
    pub root: PathBuf,
    /// Command and arguments.
    pub command: Vec<OsString>,
    /// Random id naming this container's run directory (and its default host name).
    pub id: String,
}

impl Spec {
    /// Checks `args` completely: every path exists, every value parses.
    pub fn from_args(args: RunArgs) -> Result<Spec, RunError> {
        let root = args.root.clone().unwrap_or_else(crate::image::default_root);
        let image = match &args.image {
            Some(r) => Some(ImageDefaults::load(&root, r)?),
            None => None,
        };
        let lowers = match &image {
            Some(img) => img.lowers.clone(),
            None => args
                .lowers
                .iter()
                .map(|l| existing_dir(l, "layer"))
                .collect::<Result<Vec<_>, _>>()?,
        };
        for l in &lowers {
            if l.to_string_lossy().contains(',') {
                return Err(RunError::Invalid(format!(
                    "layer path {} contains a comma, which the mount options cannot carry",
                    l.display()
                )));
            }
        }
        let volumes = args
            .volumes
            .iter()
            .map(|v| parse_volume(v))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = match &image {
            Some(img) => img.env.clone(),
            None => Vec::new(),
        };
        for file in &args.env_files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| RunError::Invalid(format!("--env-file {}: {e}", file.display())))?;
            for line in text.lines().map(str::trim) {
                if !line.is_empty() && !line.starts_with('#') {
                    env.push(parse_env(line)?);
                }
            }
        }
        for e in &args.env {
            env.push(parse_env(e)?);
        }
        let workdir = match args
            .workdir
            .or_else(|| image.as_ref().and_then(|i| i.workdir.clone()))
        {
            Some(w) => Some(container_path(&w, "-w")?),
            None => None,
        };
        let user = match args
            .user
            .or_else(|| image.as_ref().and_then(|i| i.user.clone()))
        {
            Some(u) => Some(parse_user(&u)?),
            None => None,
        };
        let command = match &image {
            Some(img) => img.command(args.command)?,
            None => args.command,
        };
        let id = random_id();
        let hostname = match args.hostname {
            Some(h) => check_hostname(h)?,
            None => id.clone(),
        };
        let limits = Limits {
            memory: args.memory.as_deref().map(parse_size).transpose()?,
            cpu_max: args.cpus.map(cpu_max).transpose()?,
            pids: match args.pids_limit {
                Some(0) => return Err(RunError::Invalid("--pids-limit must be at least 1".into())),
                p => p,
            },
        };
        if args.keep && args.upper.is_some() {
            return Err(RunError::Invalid(
                "--keep applies to the temporary upper layer; --upper DIR is kept anyway".into(),
            ));
        }
        Ok(Spec {
            lowers,
            upper: args.upper,
            keep: args.keep,
            volumes,
            env,
            workdir,
            user,
            hostname,
            read_only: args.read_only,
            tty: args.tty,
            interactive: args.interactive,
            net: args.net,
            limits,
            root,
            command,
            id,
        })
    }
}

/// What `--image` contributes: the layers, and the config's defaults.
#[derive(Debug, Clone)]
struct ImageDefaults {
    lowers: Vec<PathBuf>,
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
}

impl ImageDefaults {
    fn load(root: &Path, reference: &str) -> Result<ImageDefaults, RunError> {
        let bad =
            |e: crate::image::ImageError| RunError::Invalid(format!("--image {reference}: {e}"));
        let store = crate::image::store::Store::open(root).map_err(bad)?;
        let img = store.resolve(reference).map_err(bad)?;
        let (_, cfg) = store.config(&img).map_err(bad)?;
        let d = cfg.config;
        let env = d
            .env
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Ok(ImageDefaults {
            lowers: store.lowerdirs(&img).map_err(bad)?,
            env,
            entrypoint: d.entrypoint.unwrap_or_default(),
            cmd: d.cmd.unwrap_or_default(),
            workdir: d.working_dir.filter(|w| !w.is_empty()),
            user: d.user.filter(|u| !u.is_empty()),
        })
    }

    /// Entrypoint, then the given arguments or else the image's Cmd (docker's rule).
    fn command(&self, given: Vec<OsString>) -> Result<Vec<OsString>, RunError> {
        let mut out: Vec<OsString> = self.entrypoint.iter().map(OsString::from).collect();
        if given.is_empty() {
            out.extend(self.cmd.iter().map(OsString::from));
        } else {
            out.extend(given);
        }
        if out.is_empty() {
            return Err(RunError::Invalid(
                "no command given and the image has no Entrypoint or Cmd".into(),
            ));
        }
        Ok(out)
    }
}

/// Canonical path of an existing directory.
fn existing_dir(path: &Path, what: &str) -> Result<PathBuf, RunError> {
    let canon = std::fs::canonicalize(path)
        .map_err(|e| RunError::Invalid(format!("{what} {}: {e}", path.display())))?;
    if !canon.is_dir() {
        return Err(RunError::Invalid(format!(
            "{what} {} is not a directory",
            path.display()
        )));
    }
    Ok(canon)
}

/// `HOST:CTR[:ro|rw]`.
fn parse_volume(spec: &str) -> Result<Volume, RunError> {
    let bad = |why: &str| RunError::Invalid(format!("bad volume {spec:?}: {why}"));
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, target, mode) = match parts.as_slice() {
        [h, c] => (*h, *c, None),
        [h, c, m] => (*h, *c, Some(*m)),
        _ => return Err(bad("expected HOST:CTR or HOST:CTR:ro")),
    };
    let read_only = match mode {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(m) => return Err(bad(&format!("unknown mode {m:?} (ro or rw)"))),
    };
    if host.is_empty() || !host.starts_with('/') {
        return Err(bad("the host path must be absolute"));
    }
    let host = std::fs::canonicalize(host).map_err(|e| bad(&format!("{host}: {e}")))?;
    let target =
        container_path(target, "volume target").map_err(|_| bad("CTR must be absolute"))?;
    if target == Path::new("/") {
        return Err(bad("cannot mount a volume over /"));
    }
    Ok(Volume {
        host,
        target,
        read_only,
    })
}

/// An absolute container path, normalized (`.` and `..` resolved lexically, as inside a
/// chroot where `/..` is `/`).
fn container_path(p: &str, what: &str) -> Result<PathBuf, RunError> {
    if !p.starts_with('/') {
        return Err(RunError::Invalid(format!(
            "{what} {p:?} must be an absolute path"
        )));
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(p).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `K=V`, or `K` (taken from the caller's environment; skipped there when unset).
fn parse_env(s: &str) -> Result<(String, String), RunError> {
    let (k, v) = match s.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (s.to_string(), std::env::var(s).unwrap_or_default()),
    };
    if k.is_empty() || k.contains('\0') || v.contains('\0') {
        return Err(RunError::Invalid(format!("bad environment variable {s:?}")));
    }
    Ok((k, v))
}

/// `USER[:GROUP]`.
fn parse_user(s: &str) -> Result<(String, Option<String>), RunError> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g.to_string())),
        None => (s, None),
    };
    if u.is_empty() || g.as_deref() == Some("") {
        return Err(RunError::Invalid(format!(
            "bad user {s:?}: expected USER[:GROUP]"
        )));
    }
    Ok((u.to_string(), g))
}

/// A host name the kernel and resolvers accept.
fn check_hostname(h: String) -> Result<String, RunError> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(h)
    } else {
        Err(RunError::Invalid(format!(
            "bad host name {h:?}: 1 to 64 letters, digits, '-' or '.'"
        )))
    }
}

/// Bytes from `123`, `64k`, `512m`, `2g`.
fn parse_size(s: &str) -> Result<u64, RunError> {
    let bad = || RunError::Invalid(format!("bad --memory {s:?}: expected bytes or N[kmg]"));
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|b| *b > 0).ok_or_else(bad)
}

/// `cpu.max` for `--cpus N`: N times a 100 ms period.
fn cpu_max(cpus: f64) -> Result<String, RunError> {
    if !(cpus.is_finite() && (0.01..=4096.0).contains(&cpus)) {
        return Err(RunError::Invalid(format!(
            "bad --cpus {cpus}: expected 0.01 to 4096"
        )));
    }
    let period = 100_000u64;
    Ok(format!(
        "{} {period}",
        (cpus * period as f64).round() as u64
    ))
}

/// 12 random hex digits.
fn random_id() -> String {
    let mut buf = [0u8; 6];
    if rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        buf.copy_from_slice(&(t ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes() {
        let v = parse_volume("/tmp:/data:ro").expect("valid");
        assert!(v.read_only);
        assert_eq!(v.target, PathBuf::from("/data"));
        assert_eq!(
            parse_volume("/tmp:/a/../b").expect("valid").target,
            PathBuf::from("/b")
        );
        for bad in [
            "/tmp",
            "/tmp:data",
            "tmp:/data",
            "/tmp:/d:rx",
            "/tmp:/",
            "/nonexistent-x:/d",
        ] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_size("512m").ok(), Some(512 << 20));
        assert_eq!(parse_size("2G").ok(), Some(2 << 30));
        assert_eq!(parse_size("1000").ok(), Some(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(cpu_max(0.5).ok().as_deref(), Some("50000 100000"));
        assert!(cpu_max(0.0).is_err());
    }

    #[test]
    fn users_env_hostnames() {
        assert_eq!(
            parse_user("1000:100").ok(),
            Some(("1000".into(), Some("100".into())))
        );
        assert!(parse_user(":5").is_err());
        assert_eq!(parse_env("A=b=c").ok(), Some(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err());
        assert!(check_hostname("box-1.local".into()).is_ok());
        assert!(check_hostname("bad name".into()).is_err());
    }
}
