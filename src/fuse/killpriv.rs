//! Removing set-id bits for the kernel (`FUSE_HANDLE_KILLPRIV_V2`).
//!
//! Why v2: without it the kernel asks us for `security.capability` before every write(2)
//! (one round trip per write, never cached: 4 KiB random writes ran at 80 MiB/s instead of
//! 148 through passthrough). With it the kernel leaves removing set-id bits to the
//! filesystem. The upper filesystem does part of that by itself, as the daemon writes and
//! chowns the real file (Linux >= 6.2 drops setuid, and setgid with group execute, for every
//! writer), but it sees the daemon, not the caller: setgid without group execute goes for a
//! caller outside the file's group, and nothing goes when root truncates. The kernel signals:
//! - a WRITE with `FUSE_WRITE_KILL_SUIDGID`: a write through the daemon by a caller without
//!   CAP_FSETID;
//! - a SETATTR of the size: a truncate (fuser does not show its kill flag);
//! - a SETATTR of nothing: either `file_remove_privs` before a write that does not come to
//!   us (passthrough, page cache), forced, or chown(2) to owner and group -1, which needs the
//!   right to change the mode when a bit is to go. The caller's system call tells which.

use fuser::{Errno, FileAttr, FileType as FuseFileType, INodeNo, Request};

use crate::error::Error;
use crate::fuse::{OverlayFs, file_attr};
use crate::ovl::setattr::SetAttr;
use crate::sys::process::{in_chown_syscall, in_group};

/// What a SETATTR without a mode asks of the set-id bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillRequest {
    /// Nothing: an ordinary change (times, owner, ...).
    None,
    /// A truncate by the caller.
    Truncate,
    /// A write by the caller, or chown(2) to owner and group -1.
    WriteOrChown,
}

impl KillRequest {
    /// Classifies a SETATTR by the attributes it carries (see the module comment).
    pub(crate) fn of(mode: bool, owner: bool, size: bool, times: bool) -> Self {
        match (mode, owner, size, times) {
            (false, false, true, _) => KillRequest::Truncate,
            (false, false, false, false) => KillRequest::WriteOrChown,
            _ => KillRequest::None,
        }
    }
}

/// The mode of a file with `attr` after a write by `req`'s caller (kernel
/// `setattr_should_drop_suidgid`: setuid always goes, setgid with group execute too, setgid
/// without it for a caller outside the group; root counts as holding CAP_FSETID); `None`
/// when it stays.
fn mode_after_write(req: &Request, attr: &FileAttr) -> Option<u32> {
    if attr.kind != FuseFileType::RegularFile {
        return None;
    }
    let mode = u32::from(attr.perm);
    let mut kept = mode & !libc::S_ISUID;
    if mode & libc::S_ISGID != 0 {
        let outsider = req.uid() != 0 && req.gid() != attr.gid && !in_group(req.pid(), attr.gid);
        if mode & libc::S_IXGRP != 0 || outsider {
            kept &= !libc::S_ISGID;
        }
    }
    (kept != mode).then_some(kept)
}

impl OverlayFs {
    /// The mode to set for a SETATTR of `ino` that carries no mode: `Ok(None)` when the mode
    /// stays, EPERM when a chown(2) would drop a bit and the caller may not change the mode.
    pub(crate) fn killed_mode(
        &self,
        req: &Request,
        ino: INodeNo,
        kill: KillRequest,
    ) -> Result<Option<u32>, Errno> {
        // Root keeps set-id bits when it truncates (it holds CAP_FSETID).
        if kill == KillRequest::None || (kill == KillRequest::Truncate && req.uid() == 0) {
            return Ok(None);
        }
        let attr = self
            .node(ino)
            .and_then(|n| self.ovl.getattr(&n))
            .map(|st| file_attr(&st, &self.ovl.cfg.ids))
            .map_err(|e| Self::fail("setattr", &e))?;
        let Some(mode) = mode_after_write(req, &attr) else {
            return Ok(None);
        };
        let may_chmod = req.uid() == 0 || req.uid() == attr.uid;
        if kill == KillRequest::WriteOrChown
            && !may_chmod
            && in_chown_syscall(req.pid()) == Some(true)
        {
            return Err(Errno::EPERM);
        }
        Ok(Some(mode))
    }

    /// Drops the set-id bits a write by `req`'s caller drops (a WRITE flagged
    /// `FUSE_WRITE_KILL_SUIDGID`).
    pub(crate) fn kill_on_write(&self, req: &Request, ino: INodeNo) -> Result<(), Error> {
        let node = self.node(ino)?;
        let attr = file_attr(&self.ovl.getattr(&node)?, &self.ovl.cfg.ids);
        if let Some(mode) = mode_after_write(req, &attr) {
            let change = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            self.ovl.setattr(&node, change, None)?;
        }
        Ok(())
    }
}
