//! A merged directory listing in compact form: every name in one buffer, a fixed-size slot per
//! entry.
//!
//! Why: listings are kept while streams may still read them (see `readdir::Listings`) and are
//! rebuilt whenever the kernel drops its cached copy, which it does under memory pressure in
//! the middle of a walk. As a vector of entries that each own their name, a 10k-entry listing
//! took ~72 bytes and one allocation per entry, and building it again on a full daemon raised
//! its peak memory by megabytes; here an entry is 16 bytes plus its name's bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::FileType;

use crate::ovl::inode::Ino;

/// One entry of a [`Listing`], borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The name.
    pub name: &'a OsStr,
    /// `d_ino`: the same number `stat` reports for the entry.
    pub ino: Ino,
    /// `d_type`.
    pub file_type: FileType,
}

/// Where one entry's name ends in the name buffer, its number and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    ino: Ino,
    name_end: u32,
    file_type: FileType,
}

/// The entries of one merged listing, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    names: Vec<u8>,
    slots: Vec<Slot>,
}

impl Listing {
    /// Appends an entry. Names are at most 255 bytes, so a listing of 16 million of them
    /// fits the 32-bit name offsets; a name past that is refused (`false`).
    pub fn push(&mut self, name: &OsStr, ino: Ino, file_type: FileType) -> bool {
        let Ok(name_end) = u32::try_from(self.names.len() + name.len()) else {
            return false;
        };
        self.names.extend_from_slice(name.as_bytes());
        self.slots.push(Slot {
            ino,
            name_end,
            file_type,
        });
        true
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> Option<DirEntry<'_>> {
        let slot = self.slots.get(i)?;
        let start = match i {
            0 => 0,
            _ => self.slots.get(i - 1).map_or(0, |s| s.name_end as usize),
        };
        let name = self.names.get(start..slot.name_end as usize)?;
        Some(DirEntry {
            name: OsStr::from_bytes(name),
            ino: slot.ino,
            file_type: slot.file_type,
        })
    }

    /// The entries from index `start` on, with their indexes.
    pub fn iter_from(&self, start: usize) -> impl Iterator<Item = (usize, DirEntry<'_>)> {
        (start..self.len()).filter_map(|i| self.get(i).map(|e| (i, e)))
    }

    /// Gives back the capacity not used (a listing is kept, not extended, once built).
    pub fn shrink_to_fit(&mut self) {
        self.names.shrink_to_fit();
        self.slots.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_as_pushed() {
        let mut l = Listing::default();
        assert!(l.is_empty());
        assert!(l.push(OsStr::new("."), Ino(5), FileType::Directory));
        assert!(l.push(OsStr::new("a"), Ino(7), FileType::RegularFile));
        assert!(l.push(OsStr::from_bytes(b"\xffbin\x01"), Ino(9), FileType::Symlink));
        assert_eq!(l.len(), 3);
        let all: Vec<_> = l.iter_from(0).collect();
        assert_eq!(
            all,
            vec![
                (
                    0,
                    DirEntry {
                        name: OsStr::new("."),
                        ino: Ino(5),
                        file_type: FileType::Directory
                    }
                ),
                (
                    1,
                    DirEntry {
                        name: OsStr::new("a"),
                        ino: Ino(7),
                        file_type: FileType::RegularFile
                    }
                ),
                (
                    2,
                    DirEntry {
                        name: OsStr::from_bytes(b"\xffbin\x01"),
                        ino: Ino(9),
                        file_type: FileType::Symlink
                    }
                ),
            ]
        );
        assert_eq!(l.iter_from(2).count(), 1);
        assert_eq!(l.iter_from(3).count(), 0);
        assert_eq!(l.iter_from(99).count(), 0);
        assert!(l.get(3).is_none());
    }

    #[test]
    fn equal_listings_compare_equal() {
        let mut a = Listing::default();
        let mut b = Listing::default();
        for l in [&mut a, &mut b] {
            l.push(OsStr::new("ab"), Ino(1), FileType::RegularFile);
            l.push(OsStr::new("c"), Ino(2), FileType::RegularFile);
        }
        assert_eq!(a, b);
        let mut c = Listing::default();
        c.push(OsStr::new("a"), Ino(1), FileType::RegularFile);
        c.push(OsStr::new("bc"), Ino(2), FileType::RegularFile);
        assert_ne!(a, c, "the same bytes split differently are other names");
    }
}
