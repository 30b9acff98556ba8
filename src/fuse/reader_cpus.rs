//! Keeping the sleeping readers off the polling reader's CPU while busy polling is on (see
//! [`crate::fuse::busy_poll`] for why): the poller alone on a CPU other than its latest
//! caller's, the other readers on the rest. When polling stops, every reader gets the CPUs
//! it had before back.

use rustix::process::Pid;
use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use tracing::debug;

/// The session's reader threads and the CPUs they may use when not pinned.
pub struct ReaderCpus {
    poller: Pid,
    others: Vec<Pid>,
    allowed: CpuSet,
    /// The poller's CPU while the readers are pinned apart; None while they are not pinned.
    pinned: Option<usize>,
}

impl ReaderCpus {
    /// Finds the readers by the names fuser gives its threads (`fuser-N`); `poller_name` is
    /// the one reading the session's own fd. None until every one of the `readers` threads
    /// exists, or if fewer than two CPUs are allowed (nothing to separate).
    pub fn find(poller_name: &str, readers: usize) -> Option<ReaderCpus> {
        let allowed = sched_getaffinity(None).ok()?;
        if allowed.count() < 2 {
            return None;
        }
        let mut poller = None;
        let mut others = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
                .and_then(Pid::from_raw)
            else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue;
            };
            let comm = comm.trim_end();
            if comm == poller_name {
                poller = Some(tid);
            } else if comm.starts_with("fuser-") {
                others.push(tid);
            }
        }
        let poller = poller?;
        (others.len() + 1 == readers).then_some(ReaderCpus {
            poller,
            others,
            allowed,
            pinned: None,
        })
    }

    /// Pins the poller to a CPU other than the one process (thread) `caller` last ran on (0:
    /// not known; the poller's own current CPU if it can), the other readers to the rest;
    /// nothing if already so.
    pub fn keep_apart(&mut self, caller: u32) {
        let avoid = match caller {
            0 => None,
            pid => last_cpu(&format!("/proc/{pid}/stat")),
        };
        if self.pinned.is_some() && self.pinned != avoid {
            return;
        }
        let current = last_cpu(&format!("/proc/self/task/{}/stat", self.poller));
        let Some(cpu) = choose_cpu(&self.allowed, avoid, current) else {
            return;
        };
        let mut alone = CpuSet::new();
        alone.set(cpu);
        let mut rest = self.allowed;
        rest.unset(cpu);
        self.place(&alone, &rest);
        self.pinned = Some(cpu);
        debug!(cpu, ?avoid, "polling reader apart");
    }

    /// Gives every reader its former CPUs back.
    pub fn rejoin(&mut self) {
        if self.pinned.take().is_some() {
            self.place(&self.allowed, &self.allowed);
        }
    }

    fn place(&self, poller: &CpuSet, others: &CpuSet) {
        // Best effort: a reader that cannot move only costs speed.
        if let Err(e) = sched_setaffinity(Some(self.poller), poller) {
            debug!(error = %e, "cannot place the polling reader");
        }
        for &tid in &self.others {
            let _ = sched_setaffinity(Some(tid), others);
        }
    }
}

/// The poller's CPU: an allowed one other than `avoid`, `current` if it is one.
fn choose_cpu(allowed: &CpuSet, avoid: Option<usize>, current: Option<usize>) -> Option<usize> {
    let usable = |c: &usize| allowed.is_set(*c) && Some(*c) != avoid;
    current
        .filter(usable)
        .or_else(|| (0..CpuSet::MAX_CPU).find(usable))
}

/// The CPU a thread last ran on: field 39 of its `stat` file at `path`.
fn last_cpu(path: &str) -> Option<usize> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(36)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poller_keeps_its_cpu_unless_the_caller_is_there() {
        let mut allowed = CpuSet::new();
        for c in [1, 2, 5] {
            allowed.set(c);
        }
        assert_eq!(choose_cpu(&allowed, Some(1), Some(2)), Some(2));
        assert_eq!(choose_cpu(&allowed, Some(2), Some(2)), Some(1));
        assert_eq!(
            choose_cpu(&allowed, None, Some(3)),
            Some(1),
            "3 is not allowed"
        );
        assert_eq!(choose_cpu(&allowed, None, None), Some(1));
        let mut one = CpuSet::new();
        one.set(4);
        assert_eq!(choose_cpu(&one, Some(4), Some(4)), None);
    }

    #[test]
    fn finds_named_threads_and_pins_them_apart() {
        if sched_getaffinity(None).map_or(0, |s| s.count()) < 2 {
            return; // one CPU: nothing to separate
        }
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stop_rx = std::sync::Arc::new(std::sync::Mutex::new(stop_rx));
        let names = ["fuser-0", "fuser-1"];
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = names
            .iter()
            .map(|name| {
                let (rx, ready) = (stop_rx.clone(), ready_tx.clone());
                std::thread::Builder::new()
                    .name(name.to_string())
                    .spawn(move || {
                        ready.send(rustix::thread::gettid()).unwrap();
                        let _ = rx.lock().unwrap().recv();
                    })
                    .unwrap()
            })
            .collect();
        let tids: Vec<Pid> = (0..names.len()).map(|_| ready_rx.recv().unwrap()).collect();
        assert!(
            ReaderCpus::find("fuser-1", 3).is_none(),
            "a reader is missing"
        );
        let mut readers = ReaderCpus::find("fuser-1", 2).expect("both readers found");
        assert!(tids.contains(&readers.poller) && readers.others.len() == 1);
        readers.keep_apart(0);
        assert!(readers.pinned.is_some());
        let poller = sched_getaffinity(Some(readers.poller)).unwrap();
        let other = sched_getaffinity(Some(readers.others[0])).unwrap();
        assert_eq!(poller.count(), 1, "the poller has one CPU");
        assert!(
            (0..CpuSet::MAX_CPU).all(|c| !(poller.is_set(c) && other.is_set(c))),
            "no CPU shared"
        );
        readers.rejoin();
        let back = sched_getaffinity(Some(readers.others[0])).unwrap();
        assert_eq!(back.count(), readers.allowed.count());
        drop(stop_tx);
        for t in threads {
            t.join().unwrap();
        }
    }
}
