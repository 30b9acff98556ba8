//! stratafs: a union filesystem in userspace with kernel overlayfs semantics and the
//! fuse-overlayfs command line.
//!
//! - [`ovl`]: the union core (layers, lookup, whiteouts, readdir, files), free of FUSE;
//! - [`fuse`]: the thin adapter from FUSE requests to the core, and the daemon's life;
//! - [`image`]: the image store (`stratafs image`), layers imported from local files;
//! - [`run`]: `stratafs run`, the container launcher built on a union mount;
//! - [`sys`]: the only module with `unsafe`: fd-relative syscalls and process plumbing;
//! - [`cli`]: argument parsing shared by the subcommands;
//! - [`error`]: typed errors and the single error-to-errno mapping.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod error;
pub mod fuse;
pub mod image;
pub mod ovl;
pub mod run;
pub mod sys;
