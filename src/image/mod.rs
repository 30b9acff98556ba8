//! `stratafs image`: a content-addressed store of image layers, filled from local files (OCI
//! layouts and archives, docker archives, rootfs tarballs), whose layers `stratafs run
//! --image` and `stratafs mount --image` stack directly as lower layers.
//!
//! - [`digest`]: sha256 addresses, hashing while reading;
//! - [`extract`]: unpacking hostile layer tars fd-relative;
//! - [`oci`]: the input formats;
//! - [`meta`]: versioned, checksummed metadata files;
//! - [`store`]: the store itself (import, resolve, remove, prune).

pub mod archive;
pub mod commit;
pub mod digest;
pub mod export;
pub mod extract;
pub mod meta;
pub mod oci;
pub mod progress;
pub mod store;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use store::{Store, human};

/// Why an image operation failed. Each is one line on stderr and exit status 1.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A bad argument or an unreadable input file.
    #[error("{0}")]
    Input(String),
    /// The input does not follow its format (malformed JSON, missing files, unsupported
    /// entries).
    #[error("malformed image: {0}")]
    Format(String),
    /// An archive entry that would reach outside its layer.
    #[error("unsafe archive entry refused: {0}")]
    Unsafe(String),
    /// A truncated or corrupt tar stream.
    #[error("corrupt archive: {0}")]
    Tar(String),
    /// Content that does not hash to its recorded digest.
    #[error("digest mismatch: {0}")]
    Digest(String),
    /// The store's files could not be read or written.
    #[error("store: {0}")]
    Store(String),
    /// A store metadata file that fails its checks.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// No image by that reference.
    #[error("no such image: {0}")]
    NotFound(String),
    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Serialization failed.
    #[error("internal error: {0}")]
    Internal2(String),
}

/// Manage the image store: import images from local files, list, inspect, remove.
#[derive(Debug, Parser)]
#[command(name = "stratafs image", bin_name = "stratafs image")]
pub struct ImageArgs {
    /// Store directory. Default: /var/lib/stratafs as root, $XDG_DATA_HOME/stratafs
    /// (~/.local/share/stratafs) otherwise.
    #[arg(long, value_name = "DIR", global = true)]
    pub root: Option<PathBuf>,

    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an OCI layout directory, an OCI archive, a docker archive (docker/podman save)
    /// or a plain rootfs tarball (gzip and zstd layers are read too); prints the image id.
    Import {
        /// The file or directory.
        path: PathBuf,
        /// Name it NAME[:TAG] (default: the name the archive records, if any).
        #[arg(long, value_name = "NAME[:TAG]")]
        tag: Option<String>,
        /// Platform to pick from a multi-platform index (default: this host's).
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
    },
    /// List images.
    Ls {
        /// One JSON object per image instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show an image: id, names, layers (diff ids, sizes, directories) and its config.
    Inspect {
        /// NAME[:TAG], sha256:ID or an id prefix.
        reference: String,
    },
    /// Untag an image, or delete it when it has no other name; layers go when no image uses
    /// them.
    Rm {
        /// NAME[:TAG], sha256:ID or an id prefix; one or more.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Delete images without a name and layers no image uses.
    Prune,
    /// Write an image as an OCI archive (what `podman load` and `skopeo` read).
    Export {
        /// NAME[:TAG], sha256:ID or an id prefix.
        reference: String,
        /// The archive to write.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
}

/// Turn a container's upper directory (for example a `stratafs run --keep` upper) into a new
/// image: REF's layers plus one layer with the changes.
#[derive(Debug, Parser)]
#[command(name = "stratafs commit", bin_name = "stratafs commit")]
pub struct CommitArgs {
    /// The upper directory.
    upper: PathBuf,
    /// The image the container ran (NAME[:TAG], sha256:ID or an id prefix).
    #[arg(long, value_name = "REF")]
    from: String,
    /// Name of the new image.
    #[arg(long, value_name = "NAME[:TAG]")]
    tag: String,
    /// Comment recorded in the image history.
    #[arg(short = 'm', long = "message", value_name = "MSG")]
    message: Option<String>,
    /// Author recorded in the image config and history.
    #[arg(long, value_name = "AUTHOR")]
    author: Option<String>,
    /// Store directory (as for `stratafs image`).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// `stratafs commit ARGS...`; prints the new image id, returns the exit status.
pub fn commit_main(args: Vec<OsString>) -> i32 {
    let args: CommitArgs = match crate::cli::parse_or_status(args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let result = Store::open(&args.root.unwrap_or_else(default_root)).and_then(|store| {
        let info = commit::CommitInfo {
            message: args.message,
            author: args.author,
        };
        commit::commit(&store, &args.upper, &args.from, &args.tag, &info)
    });
    match result {
        Ok(rec) => {
            println!("{}", rec.id);
            0
        }
        Err(e) => {
            eprintln!("stratafs commit: {e}");
            1
        }
    }
}

/// The store directory when `--root` is not given (shared with `stratafs run`).
pub fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/stratafs");
    }
    match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("stratafs"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/stratafs"),
    }
}

/// `stratafs image ARGS...` (`args[0]` is the program name); returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let args: ImageArgs = match crate::cli::parse_or_status(args, 2) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stratafs image: {e}");
            1
        }
    }
}

fn run(args: ImageArgs) -> Result<(), ImageError> {
    let store = Store::open(&args.root.unwrap_or_else(default_root))?;
    match args.command {
        ImageCommand::Import {
            path,
            tag,
            platform,
        } => {
            let platform = platform.unwrap_or_else(oci::host_platform);
            let rec = store.import(&path, tag.as_deref(), &platform)?;
            println!("{}", rec.id);
        }
        ImageCommand::Ls { json } => {
            let images = store.images()?;
            if json {
                for img in &images {
                    let line = serde_json::to_string(img)
                        .map_err(|e| ImageError::Internal2(e.to_string()))?;
                    println!("{line}");
                }
            } else {
                println!("{:<40} {:<14} {:>7} {:>10}", "NAME", "ID", "LAYERS", "SIZE");
                for img in &images {
                    let size: u64 = img
                        .layers
                        .iter()
                        .filter_map(|d| store.layer(d).ok())
                        .map(|l| l.tar_size)
                        .sum();
                    let names = if img.names.is_empty() {
                        vec!["<none>".to_string()]
                    } else {
                        img.names.clone()
                    };
                    for n in names {
                        println!(
                            "{n:<40} {:<14} {:>7} {:>10}",
                            img.id.short(),
                            img.layers.len(),
                            human(size)
                        );
                    }
                }
            }
        }
        ImageCommand::Inspect { reference } => {
            let img = store.resolve(&reference)?;
            let (config, _) = store.config(&img)?;
            let config: serde_json::Value = oci::json(&config, "image config")?;
            let layers: Vec<serde_json::Value> = img
                .layers
                .iter()
                .map(|d| {
                    let size = store.layer(d).map(|l| l.tar_size).unwrap_or(0);
                    serde_json::json!({
                        "diff_id": d.to_string(),
                        "size": size,
                        "directory": store.layer_dir(d),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "id": img.id.to_string(),
                "names": img.names,
                "added": img.added,
                "source": img.source,
                "layers": layers,
                "config": config,
            });
            let text = serde_json::to_string_pretty(&out)
                .map_err(|e| ImageError::Internal2(e.to_string()))?;
            println!("{text}");
        }
        ImageCommand::Rm { references } => {
            for r in references {
                for line in store.remove(&r)? {
                    println!("{line}");
                }
            }
        }
        ImageCommand::Export { reference, output } => {
            let id = export::export(&store, &reference, &output)?;
            println!("{id}");
        }
        ImageCommand::Prune => {
            for line in store.prune()? {
                println!("{line}");
            }
        }
    }
    Ok(())
}
