//! Progress of import, commit and export, layer by layer: a bar with bytes and throughput on
//! stderr when it is a terminal, redrawn at most ten times a second; nothing otherwise (logs
//! and pipes stay quiet).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::image::store::human;

/// One line of progress (one layer).
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    visible: bool,
}

impl Progress {
    /// Starts a line for `label`; `total` bytes when known.
    pub fn new(label: String, total: Option<u64>) -> Progress {
        Progress {
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_draw: None,
            visible: rustix::termios::isatty(io::stderr()),
        }
    }

    /// Counts `n` more bytes.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if !self.visible {
            return;
        }
        if self
            .last_draw
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(Instant::now());
        self.draw(false, "");
    }

    fn rate(&self) -> u64 {
        (self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-6)) as u64
    }

    fn draw(&self, end: bool, note: &str) {
        let bar = match self.total.filter(|t| *t > 0) {
            Some(t) => {
                let width = 24;
                let filled = ((self.done.min(t) as f64 / t as f64) * width as f64) as usize;
                format!(
                    "[{}{}] {}/{}",
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    human(self.done),
                    human(t)
                )
            }
            None => human(self.done),
        };
        let mut err = io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{} {bar} {}/s{note}",
            self.label,
            human(self.rate())
        );
        if end {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }

    /// Ends the line with the final count, time and `note`.
    pub fn finish(&self, note: &str) {
        if self.visible {
            let secs = self.started.elapsed().as_secs_f64();
            self.draw(true, &format!(" in {secs:.2} s{note}"));
        }
    }
}

/// A reader that reports the bytes it passes to a [`Progress`].
pub struct Counting<'a, R> {
    inner: R,
    progress: &'a mut Progress,
}

impl<'a, R: Read> Counting<'a, R> {
    /// Wraps `inner`.
    pub fn new(inner: R, progress: &'a mut Progress) -> Counting<'a, R> {
        Counting { inner, progress }
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }
}

/// A writer that reports the bytes it passes to a [`Progress`].
pub struct CountingWriter<W> {
    inner: W,
    progress: Progress,
}

impl<W: Write> CountingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, progress: Progress) -> CountingWriter<W> {
        CountingWriter { inner, progress }
    }

    /// The inner writer and the progress line.
    pub fn into_parts(self) -> (W, Progress) {
        (self.inner, self.progress)
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
