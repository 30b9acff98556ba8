//! Command-line plumbing shared by the subcommands (`run`, `image`, `commit`).

/// Parses `args` (`args[0]` is the program name) into `T`. `Err` carries the exit status
/// after clap has printed its message: 0 for `--help`/`--version`, `usage_error` for bad
/// input (125 for `run`, as docker; 2 elsewhere, as clap).
pub fn parse_or_status<T: clap::Parser>(
    args: Vec<std::ffi::OsString>,
    usage_error: i32,
) -> Result<T, i32> {
    T::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() { usage_error } else { 0 }
    })
}
