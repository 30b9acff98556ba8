//! The raw system calls the container launcher (`stratafs run`) needs and no safe crate API
//! offers: fork, `mount_setattr`, bringing up loopback, the capability sets, exec.
//!
//! Each wrapper states the condition under which it is sound; the launcher calls them in the
//! fixed order described in `run/mod.rs`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::sys::signal::{SigHandler, SigSet, Signal};

/// Which side of [`fork`] we are on.
pub enum ForkSide {
    /// The original process; the child has this pid.
    Parent(i32),
    /// The new process.
    Child,
}

/// `fork(2)`.
///
/// Sound only while the calling process has a single thread (the launcher forks before it
/// starts any thread), so the child is a complete copy that may allocate and lock freely.
pub fn fork() -> io::Result<ForkSide> {
    // SAFETY: see the doc comment; every caller is single-threaded at this point.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(ForkSide::Parent(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(ForkSide::Child),
    }
}

/// Spawns `cmd` so that it gets SIGKILL when the launcher dies (`PR_SET_PDEATHSIG`): a
/// killed launcher must not leave a FUSE daemon serving a namespace nobody uses.
pub fn spawn_tied_to_parent(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe
    // system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(io::Error::from)
        });
    }
    cmd.spawn()
}

/// Kernel `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// Makes the mount `fd` refers to (an `open_tree` clone, or a directory that is a mount's
/// root) read-only, with every mount below it when `recursive`. Unlike a remount this keeps
/// the flags a user namespace may not clear (nosuid, nodev), so it works rootless.
pub fn mount_set_readonly(fd: BorrowedFd<'_>, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: the path is a valid empty C string, `attr` a properly sized `struct mount_attr`
    // that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up (a fresh network
/// namespace has `lo` down, and programs expect 127.0.0.1 to work).
pub fn loopback_up() -> io::Result<()> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, a valid ifreq naming "lo".
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kernel `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// Kernel `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Highest capability number the running kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Limits the process to the capabilities in `keep` (a bit mask of `CAP_*` numbers): drops
/// every other one from the bounding set (so no exec can regain it), clears the ambient set,
/// and sets the permitted, effective and inheritable sets to `keep` as far as they allow.
pub fn limit_capabilities(keep: u64) -> io::Result<()> {
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) == 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                // EINVAL: a capability this kernel does not have.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: v3 capget fills two CapData structs for the calling thread.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, d) in data.iter_mut().enumerate() {
        let mask = (keep >> (32 * i)) as u32;
        d.permitted &= mask;
        d.effective &= mask;
        d.inheritable &= mask;
    }
    // SAFETY: v3 capset reads two CapData structs for the calling thread.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the signal state back to what a freshly started program expects: nothing blocked,
/// SIGPIPE at its default (the Rust runtime ignores it, and exec would keep that).
pub fn reset_signals() -> io::Result<()> {
    SigSet::empty().thread_set_mask().map_err(io::Error::from)?;
    // SAFETY: setting the default disposition installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) }
        .map_err(io::Error::from)?;
    Ok(())
}

/// Makes `fd` the standard input, output and error (a terminal's slave side, for `-t`) and
/// the controlling terminal of the (new) session.
pub fn use_terminal(fd: BorrowedFd<'_>) -> io::Result<()> {
    rustix::process::ioctl_tiocsctty(fd)?;
    for target in 0..=2 {
        dup_onto(fd, target)?;
    }
    Ok(())
}

/// `dup2(fd, target)`.
pub fn dup_onto(fd: BorrowedFd<'_>, target: i32) -> io::Result<()> {
    if fd.as_raw_fd() == target {
        return Ok(());
    }
    // SAFETY: plain dup2 on descriptors we own; `target` is a standard descriptor number.
    if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `execve(path, argv, envp)`; returns only on failure.
pub fn exec(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    match nix::unistd::execve(path, argv, envp) {
        Err(e) => io::Error::from(e),
        Ok(never) => match never {},
    }
}

/// Closes every descriptor from 3 up, except those in `keep`, so the container gets nothing
/// of the launcher's (a leaked directory descriptor would be a way out of the rootfs).
pub fn close_fds_except(keep: &[BorrowedFd<'_>]) {
    let keep: Vec<i32> = keep.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing descriptors of this process that nothing will use again before
        // exec (the directory stream's own descriptor is gone already).
        unsafe {
            libc::close(fd);
        }
    }
}

/// `unshare(flags)`.
///
/// Sound only in a single-threaded process (rustix marks it unsafe because other threads
/// would keep the old namespaces and `CLONE_FS`-related state would diverge); the launcher
/// and the container's pid 1 call it before starting any thread.
pub fn unshare(flags: rustix::thread::UnshareFlags) -> io::Result<()> {
    // SAFETY: see the doc comment; callers are single-threaded.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(io::Error::from)
}

/// [`fork`] into a new pid namespace, where the child is pid 1 (`clone(CLONE_NEWPID)`).
/// Unlike `unshare(CLONE_NEWPID)` this leaves the caller free to start threads afterwards
/// (the terminal relays).
///
/// Sound only while the calling process has a single thread, as for [`fork`]; no `atfork`
/// handlers run, which is fine for the same reason.
pub fn fork_new_pid_namespace() -> io::Result<ForkSide> {
    // SAFETY: a raw clone with a null stack behaves like fork: the child continues on a
    // copy-on-write copy of the caller's stack. The caller is single-threaded.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(ForkSide::Child),
        pid => Ok(ForkSide::Parent(pid as i32)),
    }
}
