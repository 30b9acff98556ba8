//! `-t`: a pseudo-terminal for the command. The launcher keeps the master side and copies
//! between it and its own standard streams (input only with `-i`), with the caller's terminal
//! in raw mode so keys such as Ctrl-C reach the container's line discipline.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{OptionalActions, Termios};

/// Both sides of a new pseudo-terminal.
pub struct Pty {
    /// The launcher's side.
    pub master: OwnedFd,
    /// The command's side (its stdin, stdout, stderr and controlling terminal).
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a pair, sized like the caller's terminal when there is one.
    pub fn open() -> io::Result<Pty> {
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let slave = rustix::fs::open(
            name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let pty = Pty { master, slave };
        pty.copy_size();
        Ok(pty)
    }

    /// Gives the terminal the caller's window size (at start and on SIGWINCH).
    pub fn copy_size(&self) {
        if let Ok(size) = rustix::termios::tcgetwinsize(io::stdout()) {
            let _ = rustix::termios::tcsetwinsize(&self.master, size);
        }
    }
}

/// The caller's terminal in raw mode until dropped.
pub struct RawMode(Option<Termios>);

impl RawMode {
    /// Switches stdin to raw mode when it is a terminal.
    pub fn enter() -> RawMode {
        let stdin = io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return RawMode(None);
        }
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(io::stdin(), OptionalActions::Now, saved);
        }
    }
}

/// Copies terminal output to stdout until the last slave descriptor closes (EIO), in a
/// thread; join it to be sure everything was written.
pub fn relay_output(master: &OwnedFd) -> io::Result<JoinHandle<()>> {
    let master = master.try_clone()?;
    Ok(std::thread::spawn(move || {
        let mut src = std::fs::File::from(master);
        let mut out = io::stdout().lock();
        let mut buf = [0u8; 16384];
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = out.flush();
        }
    }))
}

/// Copies stdin to the terminal (`-i -t`) in a detached thread; it ends with stdin or the
/// launcher.
pub fn relay_input(master: &OwnedFd) -> io::Result<()> {
    let master = master.try_clone()?;
    std::thread::spawn(move || {
        let mut dst = std::fs::File::from(master);
        let mut buf = [0u8; 4096];
        let mut stdin = io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                // End of input: send the terminal's EOF character, as typing Ctrl-D would.
                let _ = dst.write_all(&[4]);
                break;
            }
            if dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Ok(())
}
