//! Owner translation between the layers and the mount (`uidmapping=`, `gidmapping=`,
//! `squash_to_root`, `squash_to_uid=`, `squash_to_gid=`), with fuse-overlayfs's semantics,
//! so containers-storage can hand an image's layers to a container with another id map
//! without chowning a copy of them (its rootless fast path).
//!
//! A mapping `A:B:N` (several joined by `:`) says that ids `A..A+N` on disk show as
//! `B..B+N` in the mount. Shown ids come back (chown, the owner of new objects) mapped the
//! other way. An id outside every range shows as, or is stored as, the kernel's overflow id
//! (`/proc/sys/kernel/overflow{u,g}id`, usually 65534). Squashing shows every object with
//! the given owner and makes failing ownership changes succeed without effect, as
//! fuse-overlayfs does.

use std::fmt;

/// One `A:B:N` range: disk ids `A..A+N` show as `B..B+N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id on disk.
    pub disk: u32,
    /// First id shown in the mount.
    pub shown: u32,
    /// Number of ids.
    pub len: u32,
}

/// Why a mapping option was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMapping(pub String);

impl fmt::Display for BadMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `A:B:N[:A:B:N...]`. Empty fields are skipped, as fuse-overlayfs's `strtok` does:
/// containers-storage writes the list with a leading `:` (`uidmapping=:0:100000:65536`).
pub fn parse_ranges(value: &str) -> Result<Vec<IdRange>, BadMapping> {
    let bad = |why: &str| BadMapping(format!("invalid mapping {value:?}: {why}"));
    let fields: Vec<&str> = value.split(':').filter(|f| !f.is_empty()).collect();
    if fields.is_empty() || fields.len() % 3 != 0 {
        return Err(bad("expected triples CONTAINER:HOST:COUNT joined by ':'"));
    }
    let mut out = Vec::new();
    for t in fields.chunks(3) {
        let n = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| bad(&format!("{s:?} is not an id")))
        };
        let r = IdRange {
            disk: n(t[0])?,
            shown: n(t[1])?,
            len: n(t[2])?,
        };
        if r.len == 0 {
            return Err(bad("a range of 0 ids"));
        }
        if r.disk.checked_add(r.len - 1).is_none() || r.shown.checked_add(r.len - 1).is_none() {
            return Err(bad("a range past the largest id"));
        }
        out.push(r);
    }
    Ok(out)
}

/// Translation of one kind of id (users or groups).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMapping {
    /// Ranges from `uidmapping=`/`gidmapping=`; empty: ids pass unchanged.
    pub ranges: Vec<IdRange>,
    /// Every object shows with this id (`squash_to_*`).
    pub squash: Option<u32>,
    /// What an unmapped id becomes.
    pub overflow: u32,
}

impl IdMapping {
    /// The id shown for `disk`.
    pub fn shown(&self, disk: u32) -> u32 {
        match self.squash {
            Some(s) => s,
            None => self.translate(disk, |r| r.disk, |r| r.shown),
        }
    }

    /// The id stored for the shown id `shown`.
    pub fn disk(&self, shown: u32) -> u32 {
        self.translate(shown, |r| r.shown, |r| r.disk)
    }

    /// `id` from the `from` side of the ranges to their `to` side; unchanged without ranges,
    /// the overflow id outside all of them.
    fn translate(&self, id: u32, from: fn(&IdRange) -> u32, to: fn(&IdRange) -> u32) -> u32 {
        if self.ranges.is_empty() {
            return id;
        }
        self.ranges
            .iter()
            .find(|r| id >= from(r) && id - from(r) < r.len)
            .map_or(self.overflow, |r| to(r) + (id - from(r)))
    }

    /// Whether ids pass unchanged both ways.
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }
}

/// Users and groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    /// User ids.
    pub uids: IdMapping,
    /// Group ids.
    pub gids: IdMapping,
}

impl IdMap {
    /// Whether owners are squashed (ownership changes that fail are then ignored).
    pub fn squashes(&self) -> bool {
        self.uids.squash.is_some() || self.gids.squash.is_some()
    }

    /// Whether nothing is translated.
    pub fn is_identity(&self) -> bool {
        self.uids.is_identity() && self.gids.is_identity()
    }
}

/// The kernel's overflow id of `kind` ("uid" or "gid"): 65534 unless configured otherwise.
pub fn kernel_overflow_id(kind: &str) -> u32 {
    std::fs::read_to_string(format!("/proc/sys/kernel/overflow{kind}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(v: &str) -> IdMapping {
        IdMapping {
            ranges: parse_ranges(v).unwrap(),
            squash: None,
            overflow: 65534,
        }
    }

    #[test]
    fn maps_both_ways_and_overflows_outside_the_ranges() {
        let m = mapping("0:100000:1000:5000:2000:10");
        assert_eq!(m.shown(0), 100000);
        assert_eq!(m.shown(999), 100999);
        assert_eq!(m.shown(1000), 65534);
        assert_eq!(m.shown(5009), 2009);
        assert_eq!(m.disk(100500), 500);
        assert_eq!(m.disk(2000), 5000);
        assert_eq!(m.disk(7), 65534);
        assert_eq!(IdMapping::default().shown(42), 42);
        assert_eq!(IdMapping::default().disk(42), 42);
    }

    #[test]
    fn squash_wins_on_the_way_out_only() {
        let m = IdMapping {
            squash: Some(1000),
            ..mapping("0:100000:10")
        };
        assert_eq!(m.shown(3), 1000);
        assert_eq!(m.shown(77), 1000);
        assert_eq!(m.disk(100003), 3);
    }

    #[test]
    fn empty_fields_are_skipped_as_containers_storage_writes_them() {
        assert_eq!(
            parse_ranges(":0:100000:65536").unwrap(),
            parse_ranges("0:100000:65536").unwrap()
        );
        assert_eq!(parse_ranges("0:1:2::3:4:5").unwrap().len(), 2);
    }

    #[test]
    fn bad_mappings_are_refused() {
        for v in [
            "",
            "0:1",
            "0:1:2:3",
            "a:1:2",
            "0:1:0",
            "4294967295:0:2",
            "0:-1:1",
        ] {
            assert!(parse_ranges(v).is_err(), "{v}");
        }
    }
}
