//! The `stratafs` command: a drop-in for `fuse-overlayfs`.
//!
//! `stratafs [-f] [-d] -o lowerdir=L1:L2[,upperdir=U,workdir=W][,OPTS] [SOURCE] MOUNTPOINT`, or
//! the same after `stratafs mount`. The last positional argument is the mountpoint, so that
//! `mount -t fuse.stratafs SOURCE MNT -o ...` (through mount.fuse3) and fstab lines work.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stratafs::fuse::session::{self, MountRequest};
use stratafs::ovl::params::Config;

/// Mount a union of directories with kernel-overlayfs semantics (FUSE).
#[derive(Debug, Parser)]
#[command(
    name = "stratafs",
    version,
    about,
    after_help = "Examples:\n  stratafs -o lowerdir=/l1:/l2,upperdir=/u,workdir=/w /mnt\n  stratafs -o lowerdir=/image /mnt      (read-only)\n  fusermount3 -u /mnt                   (unmount; SIGTERM to the daemon works too)\n  stratafs run --lower /l1 -- sh        (a container on a union: see stratafs run --help)"
)]
struct MountArgs {
    /// Mount options, comma separated; may repeat and may be glued (-oOPTS). lowerdir=A:B
    /// (leftmost is the top layer; \: escapes a colon), upperdir=DIR, workdir=DIR (same
    /// filesystem as upperdir), timeout=SECS, static_nlink, noxattrs=1, ro, allow_other,
    /// allow_root, suid/nosuid, dev/nodev, exec/noexec, atime/noatime, fsname=NAME,
    /// redirect_dir=on|follow|off|nofollow, metacopy=on|off, index=on|off,
    /// passthrough=on|off, busy_poll=MICROS, io_uring[=WORKERS], noacl, fsync=0, volatile, uidmapping=A:B:N[:A:B:N...] and
    /// gidmapping= (disk ids A.. show as B..), squash_to_root, squash_to_uid=N,
    /// squash_to_gid=N, xattr_permissions=1|2, xino=off|auto|on, context=LABEL (accepted and ignored). Options of
    /// fuse-overlayfs that stratafs does not apply print "unknown argument ignored: X".
    /// README.md explains each.
    #[arg(short = 'o', value_name = "OPTS", action = clap::ArgAction::Append)]
    options: Vec<String>,

    /// Stay in the foreground instead of going to the background once mounted.
    #[arg(short = 'f')]
    foreground: bool,

    /// Debug logging to stderr (implies -f); RUST_LOG also selects log levels.
    #[arg(short = 'd', long = "debug")]
    debug: bool,

    /// Accepted for libfuse compatibility (the daemon is always multi-threaded).
    #[arg(short = 's', hide = true)]
    single_thread: bool,

    /// [SOURCE] MOUNTPOINT: the last one is the mountpoint; a SOURCE before it is shown in
    /// /proc/mounts and otherwise ignored.
    #[arg(value_name = "MOUNTPOINT", num_args = 0..)]
    positional: Vec<OsString>,

    /// Print the man page (roff) made from these definitions, and exit (tools/install
    /// installs it); `--man run|image|commit` prints that subcommand's page.
    #[arg(long, hide = true, exclusive = true, num_args = 0..=1, value_name = "PAGE",
          default_missing_value = "stratafs",
          value_parser = ["stratafs", "run", "image", "commit"])]
    man: Option<String>,

    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell), and exit.
    #[arg(long, value_name = "SHELL", hide = true, exclusive = true)]
    completions: Option<clap_complete::Shell>,

    /// Mount an image from the store (`stratafs image import`): its layers become lowerdir=
    /// (read-only unless --upper is given).
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// With --image: the store directory (default /var/lib/stratafs as root,
    /// $XDG_DATA_HOME/stratafs otherwise).
    #[arg(long, value_name = "DIR", requires = "image")]
    root: Option<PathBuf>,

    /// With --image: upper layer (upperdir=), makes the mount writable.
    #[arg(long, value_name = "DIR", requires_all = ["image", "work"])]
    upper: Option<PathBuf>,

    /// With --image: workdir= (same filesystem as --upper).
    #[arg(long, value_name = "DIR", requires = "upper")]
    work: Option<PathBuf>,
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "image") {
        let code = stratafs::image::main(args[1..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if args.get(1).is_some_and(|a| a == "commit") {
        let code = stratafs::image::commit_main(args[1..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if args.get(1).is_some_and(|a| a == "run") {
        let code = stratafs::run::main(args[1..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(125));
    }
    // `stratafs mount ...` is the same as `stratafs ...`.
    if args.get(1).is_some_and(|a| a == "mount") {
        args.remove(1);
    }
    let args = MountArgs::parse_from(args);
    if args.man.is_some() || args.completions.is_some() {
        return match print_docs(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stratafs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match mount(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("stratafs: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn mount(mut args: MountArgs) -> Result<(), String> {
    if let Some(reference) = &args.image {
        let opts = image_options(reference, &args)?;
        args.options.push(opts);
    }
    let cfg = Config::parse(&args.options).map_err(|e| e.to_string())?;
    init_logging(args.debug || cfg.debug);
    for opt in &cfg.ignored {
        eprintln!("unknown argument ignored: {opt}");
    }
    let mut positional = args.positional;
    let mountpoint: PathBuf = positional
        .pop()
        .ok_or_else(|| stratafs::error::SetupError::NoMountpoint.to_string())?
        .into();
    let source = positional.pop().map(|s| s.to_string_lossy().into_owned());
    let foreground = args.foreground || args.debug || cfg.debug;
    session::run(MountRequest {
        cfg,
        mountpoint,
        source,
        foreground,
    })
    .map_err(|e| e.to_string())
}

/// `-o lowerdir=...[,upperdir=...,workdir=...]` for `--image REF`.
fn image_options(reference: &str, args: &MountArgs) -> Result<String, String> {
    if args
        .options
        .iter()
        .any(|o| o.split(',').any(|kv| kv.starts_with("lowerdir=")))
    {
        return Err("--image gives the lower layers; do not also pass -o lowerdir=".into());
    }
    let root = args
        .root
        .clone()
        .unwrap_or_else(stratafs::image::default_root);
    let bad = |e: stratafs::image::ImageError| format!("--image {reference}: {e}");
    let store = stratafs::image::store::Store::open(&root).map_err(bad)?;
    let img = store.resolve(reference).map_err(bad)?;
    let lowers = store.lowerdirs(&img).map_err(bad)?;
    let mut opts = format!(
        "lowerdir={}",
        stratafs::ovl::params::lowerdir_value(&lowers)
    );
    if let (Some(u), Some(w)) = (&args.upper, &args.work) {
        opts += &format!(",upperdir={},workdir={}", u.display(), w.display());
    }
    Ok(opts)
}

/// The man page or a completion script, generated from the argument definitions above so
/// they cannot drift from the real command line.
fn print_docs(args: &MountArgs) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut out = std::io::stdout().lock();
    if let Some(shell) = args.completions {
        clap_complete::generate(shell, &mut MountArgs::command(), "stratafs", &mut out);
        return Ok(());
    }
    let cmd = match args.man.as_deref() {
        Some("run") => stratafs::run::spec::RunArgs::command().name("stratafs-run"),
        Some("image") => stratafs::image::ImageArgs::command().name("stratafs-image"),
        Some("commit") => stratafs::image::CommitArgs::command().name("stratafs-commit"),
        _ => MountArgs::command(),
    };
    clap_mangen::Man::new(cmd).render(&mut out)
}

/// Logs go to stderr; `RUST_LOG` picks levels, `-d` means debug. Colours only on a terminal:
/// a log redirected to a file (or podman's journal) gets plain text.
fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
