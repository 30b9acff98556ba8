//! `stratafs run`: a thin container launcher whose root filesystem is a stratafs union of
//! read-only layers and a private copy-on-write upper layer.
//!
//! The whole configuration is checked first ([`spec`]); then one fixed sequence (STYLE.md
//! habit 12, after bubblewrap):
//!
//! 1. launcher: a user namespace when not root ([`userns`], before no_new_privs, which would
//!    disarm the setuid newuidmap that writes its id maps); no_new_privs; its own mount
//!    namespace with private propagation, so the union is never visible on the host;
//! 2. launcher: the run directory ([`rundir`]), sweeping those of dead launchers; the FUSE
//!    daemon ([`daemon`]) mounting the union, outside everything the container will see;
//!    cgroup limits ([`cgroup`]); a pseudo-terminal with `-t` ([`tty`]);
//! 3. a child in a new pid namespace: pid 1 ([`init`]) enters new mount, UTS, IPC and network
//!    namespaces, builds /proc, /dev, /sys, /etc files and volumes and pivots into the union
//!    ([`rootfs`]), then starts the command with the default capabilities, reaps orphans and
//!    forwards signals;
//! 4. launcher: forwards signals to pid 1, waits, unmounts, removes the temporary upper.
//!
//! Every process of the container, and the daemon, dies with the launcher (parent-death
//! signals; pid 1's death ends its pid namespace), so a SIGKILLed launcher leaves no mount
//! (they only ever existed in its private namespaces) and its run directory is swept by the
//! next run.

pub mod cgroup;
pub mod daemon;
pub mod init;
pub mod rootfs;
pub mod rundir;
pub mod spec;
pub mod tty;
pub mod userns;

use std::ffi::OsString;
use std::os::fd::OwnedFd;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustix::mount::MountPropagationFlags;
use rustix::thread::UnshareFlags;

use crate::sys::container::{ForkSide, fork_new_pid_namespace};
use cgroup::Cgroup;
use daemon::Daemon;
use rundir::RunDir;
use spec::{RunArgs, Spec};

/// Exit status when the launcher itself fails (docker and podman use the same).
pub const LAUNCHER_FAILED: i32 = 125;

/// Why a container could not be started. Both kinds end the launcher with status 125 and
/// one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad input: an option, a path, a user name.
    #[error("{0}")]
    Invalid(String),
    /// A setup step failed.
    #[error("{0}")]
    Setup(String),
}

/// `stratafs run ARGS...` (`args[0]` is the program name); returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let args: RunArgs = match crate::cli::parse_or_status(args, LAUNCHER_FAILED) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let spec = match Spec::from_args(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stratafs run: {e}");
            return LAUNCHER_FAILED;
        }
    };
    match launch(&spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stratafs run: {e}");
            LAUNCHER_FAILED
        }
    }
}

/// Steps 1, 2 and the cleanup of 4.
fn launch(spec: &Spec) -> Result<i32, RunError> {
    let sys = |what: &str, e: rustix::io::Errno| RunError::Setup(format!("{what}: {e}"));
    // The user namespace comes first: its id maps are written by the setuid newuidmap and
    // newgidmap, which no_new_privs would strip of their privilege. Nothing else runs before
    // no_new_privs is set.
    userns::enter()?;
    rustix::thread::set_no_new_privs(true).map_err(|e| sys("no_new_privs", e))?;
    enter_private_namespaces()?;
    let dirs = RunDir::create(spec)?;
    rundir::sweep(&spec.root, &spec.id);
    let result = dirs
        .write_etc(&spec.hostname, spec.net == spec::NetMode::Host)
        .and_then(|()| run_with_daemon(spec, &dirs));
    let kept = dirs.finish(&spec.root, &spec.id, spec.keep);
    match kept {
        Ok(Some(path)) => eprintln!("stratafs run: upper layer kept in {}", path.display()),
        Ok(None) => {}
        Err(e) if result.is_ok() => return Err(e),
        Err(e) => eprintln!("stratafs run: {e}"),
    }
    result
}

/// A user namespace when not root, and a mount namespace of our own with private
/// propagation: what is mounted from here on is seen by no one else and vanishes with the
/// process. Must run while the process is single-threaded.
pub fn enter_private_namespaces() -> Result<(), RunError> {
    userns::enter()?; // a no-op when already root (here, or after an earlier call)
    crate::sys::container::unshare(UnshareFlags::NEWNS)
        .map_err(|e| RunError::Setup(format!("creating a mount namespace: {e}")))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(|e| RunError::Setup(format!("making mounts private: {e}")))
}

/// Mounts the union, runs the container, unmounts.
fn run_with_daemon(spec: &Spec, dirs: &RunDir) -> Result<i32, RunError> {
    let cgroup = if spec.limits.any() {
        Some(Cgroup::create(&spec.limits, &spec.id)?)
    } else {
        None
    };
    let daemon = Daemon::start(&spec.lowers, &dirs.upper, &dirs.work, &dirs.merged, "")?;
    let made = rootfs::missing_mountpoints(&dirs.merged, spec);
    let result = run_container(spec, dirs, cgroup.as_ref());
    rootfs::remove_mountpoints(&dirs.merged, &made);
    daemon.stop();
    result
}

/// Step 3 and the waiting of step 4.
fn run_container(spec: &Spec, dirs: &RunDir, cgroup: Option<&Cgroup>) -> Result<i32, RunError> {
    let pty = match spec.tty {
        true => Some(
            tty::Pty::open()
                .map_err(|e| RunError::Setup(format!("opening a pseudo-terminal: {e}")))?,
        ),
        false => None,
    };
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
        Signal::SIGWINCH,
    ] {
        signals.add(s);
    }
    let setup = |what: &str, e: std::io::Error| RunError::Setup(format!("{what}: {e}"));
    signals
        .thread_block()
        .map_err(|e| setup("blocking signals", e.into()))?;
    let (go_read, go_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| setup("pipe", e.into()))?;
    let (master, slave) = match pty {
        Some(p) => (Some(p.master), Some(p.slave)),
        None => (None, None),
    };
    let pid = match fork_new_pid_namespace().map_err(|e| setup("starting the container", e))? {
        ForkSide::Child => {
            drop((go_write, master));
            let code = init::run(init::Init {
                spec,
                dirs,
                tty: slave,
                go: go_read,
            });
            std::process::exit(code);
        }
        ForkSide::Parent(pid) => pid,
    };
    drop((go_read, slave));
    if let Some(cg) = cgroup {
        if let Err(e) = cg.add(pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            return Err(e);
        }
    }
    let _ = rustix::io::write(&go_write, b"1");
    drop(go_write);
    // Raw mode only when input goes to the container: with -t alone, Ctrl-C stays the
    // caller's and reaches the command as a forwarded SIGINT.
    let raw = (spec.interactive && master.is_some()).then(tty::RawMode::enter);
    let output = match &master {
        Some(m) => {
            if spec.interactive {
                let _ = tty::relay_input(m);
            }
            tty::relay_output(m).ok()
        }
        None => None,
    };
    let code = wait_container(Pid::from_raw(pid), &signals, master.as_ref());
    if let Some(out) = output {
        let _ = out.join();
    }
    drop(raw);
    Ok(code)
}

/// Forwards termination signals to pid 1 and window size changes to the terminal until pid 1
/// exits; returns its status (128+N if a signal killed it).
fn wait_container(pid: Pid, signals: &SigSet, master: Option<&OwnedFd>) -> i32 {
    loop {
        match nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(_) => return LAUNCHER_FAILED,
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(Signal::SIGWINCH) => {
                if let Some(m) = master {
                    if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stdout()) {
                        let _ = rustix::termios::tcsetwinsize(m, size);
                    }
                }
            }
            Ok(sig) => {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }
}
