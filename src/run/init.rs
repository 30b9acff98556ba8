//! The container's pid 1 and the command it starts.
//!
//! Pid 1 enters the remaining namespaces, builds the filesystem view (`rootfs`), starts the
//! command as pid 2, then reaps every process that ends up its child (orphans re-parent to
//! it) and forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the command. Its exit status is the
//! command's, 128+N when a signal N killed it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustix::thread::UnshareFlags;

use crate::run::rundir::RunDir;
use crate::run::spec::{NetMode, Spec};
use crate::run::{RunError, rootfs};
use crate::sys::container::{self, ForkSide};

/// The default capability set of a container, as podman and docker give it: CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT,
/// SETFCAP.
const DEFAULT_CAPS: [u32; 11] = [0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31];

/// `PATH` when the user does not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: String,
}

/// What pid 1 needs from the launcher.
pub struct Init<'a> {
    /// The validated configuration.
    pub spec: &'a Spec,
    /// The run directory (mountpoint, /etc files).
    pub dirs: &'a RunDir,
    /// The terminal's slave side with `-t`.
    pub tty: Option<OwnedFd>,
    /// Read end of the pipe on which the launcher says "go" (after placing us in a cgroup).
    pub go: OwnedFd,
}

/// Runs pid 1 to the end and returns its exit status; never returns to the launcher's code.
pub fn run(init: Init<'_>) -> i32 {
    match setup_and_start(init) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stratafs run: {e}");
            125
        }
    }
}

fn setup_and_start(init: Init<'_>) -> Result<i32, RunError> {
    let spec = init.spec;
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| RunError::Setup(format!("{what}: {e}"))
    };
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| fail("prctl")(e.into()))?;
    let mut byte = [0u8; 1];
    if !matches!(rustix::io::read(&init.go, &mut byte), Ok(1)) {
        // The launcher is gone or gave up; it has said why.
        return Ok(125);
    }
    drop(init.go);
    let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    if spec.net == NetMode::None {
        flags |= UnshareFlags::NEWNET;
    }
    crate::sys::container::unshare(flags).map_err(fail("creating namespaces"))?;
    rustix::system::sethostname(spec.hostname.as_bytes())
        .map_err(|e| fail("setting the host name")(e.into()))?;
    if spec.net == NetMode::None {
        container::loopback_up().map_err(fail("bringing up loopback"))?;
    }
    rootfs::build(spec, init.dirs)?;
    let creds = resolve_user(spec.user.as_ref())?;
    check_mapped(&creds)?;
    let env = environment(spec, &creds);
    let workdir = spec.workdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    match container::fork().map_err(fail("starting the command"))? {
        ForkSide::Child => {
            let code = exec_command(spec, &creds, &env, &workdir, init.tty);
            std::process::exit(code);
        }
        ForkSide::Parent(pid) => {
            drop(init.tty);
            Ok(reap_until_exit(Pid::from_raw(pid)))
        }
    }
}

/// Reaps children until the command (`cmd`) ends, forwarding termination signals to it.
/// The signals are blocked (the launcher blocked them before forking us) and taken with
/// sigwait, so no handler runs in pid 1.
fn reap_until_exit(cmd: Pid) -> i32 {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    loop {
        loop {
            match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == cmd => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == cmd => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(_) => return 125,
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(cmd, sig);
            }
        }
    }
}

/// In the command's process: session, terminal, capabilities, user, directory, exec.
/// Returns only on failure, with the exit status to use.
fn exec_command(
    spec: &Spec,
    creds: &Creds,
    env: &[CString],
    workdir: &Path,
    tty: Option<OwnedFd>,
) -> i32 {
    let setup = || -> Result<(), String> {
        container::reset_signals().map_err(|e| format!("signals: {e}"))?;
        let _ = rustix::process::setsid();
        match &tty {
            Some(t) => container::use_terminal(t.as_fd()).map_err(|e| format!("terminal: {e}"))?,
            None if !spec.interactive => {
                let null =
                    std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
                container::dup_onto(null.as_fd(), 0).map_err(|e| format!("stdin: {e}"))?;
            }
            None => {}
        }
        let mut keep = 0u64;
        for c in DEFAULT_CAPS {
            keep |= 1 << c;
        }
        container::limit_capabilities(keep).map_err(|e| format!("dropping capabilities: {e}"))?;
        switch_user(creds)?;
        rustix::process::chdir(workdir)
            .map_err(|e| format!("working directory {}: {e}", workdir.display()))?;
        Ok(())
    };
    if let Err(msg) = setup() {
        eprintln!("stratafs run: {msg}");
        return 125;
    }
    drop(tty);
    container::close_fds_except(&[]);
    let argv: Vec<CString> = spec
        .command
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let path = env
        .iter()
        .find_map(|e| e.to_bytes().strip_prefix(b"PATH="))
        .map_or(DEFAULT_PATH.as_bytes().to_vec(), <[u8]>::to_vec);
    let (code, why) = exec_search(&spec.command[0], &path, &argv, env);
    eprintln!("stratafs run: {}: {why}", spec.command[0].to_string_lossy());
    code
}

/// Executes `cmd` (searched in `path` when it has no `/`). Returns the exit status and the
/// reason when nothing could be executed: 127 not found, 126 found but not executable.
fn exec_search(cmd: &OsStr, path: &[u8], argv: &[CString], env: &[CString]) -> (i32, String) {
    let candidates: Vec<PathBuf> = if cmd.as_bytes().contains(&b'/') {
        vec![PathBuf::from(cmd)]
    } else {
        path.split(|b| *b == b':')
            .map(|d| {
                let dir = if d.is_empty() {
                    OsStr::new(".")
                } else {
                    OsStr::from_bytes(d)
                };
                Path::new(dir).join(cmd)
            })
            .collect()
    };
    let mut cannot: Option<io::Error> = None;
    for c in &candidates {
        let Ok(cpath) = CString::new(c.as_os_str().as_bytes()) else {
            continue;
        };
        let err = container::exec(&cpath, argv, env);
        match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => {}
            _ => {
                cannot.get_or_insert(err);
            }
        }
    }
    match cannot {
        Some(e) => (126, e.to_string()),
        None if candidates.len() == 1 && cmd.as_bytes().contains(&b'/') => {
            (127, "no such file or directory".into())
        }
        None => (127, "command not found".into()),
    }
}

/// Supplementary groups, gid, uid, in that order (each needs the privilege the next drops).
fn switch_user(c: &Creds) -> Result<(), String> {
    let groups: Vec<nix::unistd::Gid> = c
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        // A user namespace without subordinate ids denies setgroups; only fatal when the
        // user actually has supplementary groups to gain.
        if !(e == nix::errno::Errno::EPERM && c.groups.iter().all(|g| *g == c.gid)) {
            return Err(format!("setgroups: {e}"));
        }
    }
    let gid = nix::unistd::Gid::from_raw(c.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setgid {}: {e}", c.gid))?;
    let uid = nix::unistd::Uid::from_raw(c.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setuid {}: {e}", c.uid))?;
    Ok(())
}

/// The command's environment: defaults, then `-e`/`--env-file` (later wins).
fn environment(spec: &Spec, creds: &Creds) -> Vec<CString> {
    let mut vars: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOSTNAME".into(), spec.hostname.clone().into()),
        ("HOME".into(), creds.home.clone().into()),
        ("container".into(), "stratafs".into()),
    ];
    if spec.tty {
        vars.push(("TERM".into(), "xterm".into()));
    }
    for (k, v) in &spec.env {
        vars.retain(|(name, _)| name != OsStr::new(k));
        vars.push((k.into(), v.into()));
    }
    vars.into_iter()
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect()
}

/// Parses `name:x:uid:gid:...:home:shell` lines of the container's /etc/passwd.
fn passwd() -> Vec<(String, u32, u32, String)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[5].to_string(),
            ))
        })
        .collect()
}

/// Parses `name:x:gid:member,member` lines of the container's /etc/group.
fn groups() -> Vec<(String, u32, Vec<String>)> {
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// `-u USER[:GROUP]` against the container's /etc/passwd and /etc/group (numbers need no
/// entry; names must exist).
fn resolve_user(user: Option<&(String, Option<String>)>) -> Result<Creds, RunError> {
    let pw = passwd();
    let (u, g) = match user {
        Some((u, g)) => (u.as_str(), g.as_deref()),
        None => ("0", None),
    };
    let entry = match u.parse::<u32>() {
        Ok(uid) => pw
            .iter()
            .find(|e| e.1 == uid)
            .cloned()
            .map_or((None, uid, 0, "/".to_string()), |e| {
                (Some(e.0), e.1, e.2, e.3)
            }),
        Err(_) => pw
            .iter()
            .find(|e| e.0 == u)
            .cloned()
            .map(|e| (Some(e.0), e.1, e.2, e.3))
            .ok_or_else(|| {
                RunError::Invalid(format!(
                    "unknown user {u:?} (not in the container's /etc/passwd)"
                ))
            })?,
    };
    let (name, uid, mut gid, home) = entry;
    let grp = groups();
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => grp.iter().find(|e| e.0 == g).map(|e| e.1).ok_or_else(|| {
                RunError::Invalid(format!(
                    "unknown group {g:?} (not in the container's /etc/group)"
                ))
            })?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = &name {
        for (_, id, members) in &grp {
            if members.iter().any(|m| m == name) && !groups.contains(id) {
                groups.push(*id);
            }
        }
    }
    let home = if home.is_empty() { "/".into() } else { home };
    Ok(Creds {
        uid,
        gid,
        groups,
        home,
    })
}

/// Fails with a clear message when the user namespace cannot represent the ids.
fn check_mapped(c: &Creds) -> Result<(), RunError> {
    for (file, id, what) in [
        ("/proc/self/uid_map", c.uid, "user"),
        ("/proc/self/gid_map", c.gid, "group"),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mapped = text.lines().any(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            f.len() == 3 && u64::from(id) >= f[0] && u64::from(id) < f[0] + f[2]
        });
        if !mapped {
            return Err(RunError::Invalid(format!(
                "{what} {id} is not mapped in the container's user namespace (add a range for the caller to /etc/subuid and /etc/subgid and install uidmap)"
            )));
        }
    }
    Ok(())
}
