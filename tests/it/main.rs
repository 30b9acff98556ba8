//! Integration tests through the real `stratafs` binary (one test binary keeps link time
//! down). Tests that need a FUSE mount check for root and /dev/fuse first and say why they
//! skip; the command-line checks run everywhere.

mod support;

mod cli_errors;
mod deep_lookups;
mod idmap;
mod image;
mod listings;
mod mount_life;
mod override_stat;
mod passthrough;
mod readdirplus;
mod run;
mod safety;
