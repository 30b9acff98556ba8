//! The only place with `unsafe` and raw system calls that need it (STYLE.md habit 3).
//!
//! Everything else in the crate goes through the safe wrappers here, or through `rustix`.
#![allow(unsafe_code)]

pub mod container;
pub mod fs;
pub mod mountinfo;
pub mod process;
