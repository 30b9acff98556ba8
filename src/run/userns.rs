//! The user namespace of a rootless container: the caller becomes root inside, and, where
//! `newuidmap`/`newgidmap` and subordinate ranges in /etc/subuid and /etc/subgid exist, ids
//! 1..=65536 map to the caller's first subordinate range (so images with files owned by other
//! users work, as with rootless podman). Without them only root (the caller) is mapped.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;

use crate::run::RunError;
use crate::sys::container::{ForkSide, fork};

/// The caller's ids and what was mapped.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    /// Whether a full subordinate range is mapped (otherwise only 0).
    pub full: bool,
}

/// Enters a new user namespace unless the caller is already root (in the initial namespace, or
/// inside one: then there is nothing to gain). Must run while the process is single-threaded.
pub fn enter() -> Result<Option<Mapping>, RunError> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    if uid == 0 {
        return Ok(None);
    }
    let fail = |what: &str, e: std::io::Error| RunError::Setup(format!("{what}: {e}"));
    let name = user_name(uid);
    let ranges = match (
        subordinate("/etc/subuid", &name, uid),
        subordinate("/etc/subgid", &name, uid),
        find_program("newuidmap"),
        find_program("newgidmap"),
    ) {
        (Some(u), Some(g), Some(nu), Some(ng)) => Some((u, g, nu, ng)),
        _ => None,
    };
    let Some(((ustart, ucount), (gstart, gcount), newuidmap, newgidmap)) = ranges else {
        crate::sys::container::unshare(rustix::thread::UnshareFlags::NEWUSER)
            .map_err(|e| fail("creating a user namespace", e))?;
        std::fs::write("/proc/self/setgroups", "deny")
            .map_err(|e| fail("writing /proc/self/setgroups", e))?;
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"))
            .map_err(|e| fail("writing /proc/self/uid_map", e))?;
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"))
            .map_err(|e| fail("writing /proc/self/gid_map", e))?;
        return Ok(Some(Mapping { full: false }));
    };
    // newuidmap must be run from outside the namespace, for our pid: a helper forked before
    // the unshare waits for it, maps, and exits.
    let me = std::process::id();
    let (rd, wr) = rustix::pipe::pipe().map_err(|e| fail("pipe", e.into()))?;
    match fork().map_err(|e| fail("fork", e))? {
        ForkSide::Child => {
            drop(wr);
            let mut byte = [0u8; 1];
            let mut rd = std::fs::File::from(rd);
            if rd.read(&mut byte).unwrap_or(0) != 1 {
                std::process::exit(1);
            }
            let run = |prog: &PathBuf, id: u32, start: u64, count: u64| {
                Command::new(prog)
                    .args([me.to_string(), "0".into(), id.to_string(), "1".into()])
                    .args([
                        "1".to_string(),
                        start.to_string(),
                        count.min(65536).to_string(),
                    ])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let ok = run(&newuidmap, uid, ustart, ucount) && run(&newgidmap, gid, gstart, gcount);
            std::process::exit(if ok { 0 } else { 1 });
        }
        ForkSide::Parent(helper) => {
            drop(rd);
            let unshared = crate::sys::container::unshare(rustix::thread::UnshareFlags::NEWUSER);
            let _ = rustix::io::write(&wr, if unshared.is_ok() { b"1" } else { b"" });
            drop(wr);
            let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(helper), None);
            unshared.map_err(|e| fail("creating a user namespace", e))?;
            if !matches!(status, Ok(nix::sys::wait::WaitStatus::Exited(_, 0))) {
                return Err(RunError::Setup(format!(
                    "newuidmap/newgidmap failed to map the subordinate ids of {name} (see /etc/subuid, /etc/subgid)"
                )));
            }
        }
    }
    Ok(Some(Mapping { full: true }))
}

/// The login name of `uid` from /etc/passwd (the number when absent: subuid files may use it).
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The first `start:count` range of `name` (or `uid`) in a subordinate id file.
fn subordinate(file: &str, name: &str, uid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let who = f.next()?;
        if who != name && who != uid.to_string() {
            return None;
        }
        let start = f.next()?.parse().ok()?;
        let count: u64 = f.next()?.parse().ok()?;
        (count > 0).then_some((start, count))
    })
}

/// `prog` in the caller's PATH.
fn find_program(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}
