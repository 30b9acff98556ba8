//! Bad input gets one clear line on stderr, a non-zero exit, and nothing mounted.

use crate::support::{Scratch, is_mounted, run};

/// Runs stratafs with `-o opts MNT` and checks the failure contract; returns stderr.
fn refuse(s: &Scratch, opts: &str, mnt: &std::path::Path) -> String {
    let out = run(["-o", opts, mnt.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted {opts:?}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr:?}"
    );
    assert!(stderr.starts_with("stratafs: "), "{stderr:?}");
    assert!(!is_mounted(mnt), "left a mount behind for {opts:?}");
    assert!(!is_mounted(&s.mnt()));
    stderr
}

#[test]
fn missing_or_empty_lowerdir() {
    let s = Scratch::new();
    let m = s.mnt();
    assert!(refuse(&s, "upperdir=/tmp", &m).contains("no lower layer"));
    assert!(refuse(&s, "lowerdir=", &m).contains("no lower layer"));
    let e = refuse(
        &s,
        &format!(
            "lowerdir={}::{}",
            s.path("l1").display(),
            s.path("l2").display()
        ),
        &m,
    );
    assert!(e.contains("empty layer"), "{e}");
}

#[test]
fn layer_missing_or_not_a_directory() {
    let s = Scratch::new();
    let e = refuse(
        &s,
        &format!("lowerdir={}", s.path("nope").display()),
        &s.mnt(),
    );
    assert!(e.contains("No such file"), "{e}");
    s.write("l1/file", "x");
    let e = refuse(
        &s,
        &format!("lowerdir={}", s.path("l1/file").display()),
        &s.mnt(),
    );
    assert!(e.contains("Not a directory"), "{e}");
}

#[test]
fn upperdir_without_workdir() {
    let s = Scratch::new();
    let e = refuse(
        &s,
        &format!(
            "lowerdir={},upperdir={}",
            s.path("l1").display(),
            s.path("u").display()
        ),
        &s.mnt(),
    );
    assert!(e.contains("workdir"), "{e}");
}

#[test]
fn workdir_on_another_filesystem() {
    let s = Scratch::new();
    let other = std::path::Path::new("/dev/shm");
    let st_tmp = std::fs::metadata(s.path("u")).unwrap();
    let st_shm = match std::fs::metadata(other) {
        Ok(m) => m,
        Err(_) => return eprintln!("SKIP workdir_on_another_filesystem: no /dev/shm"),
    };
    use std::os::unix::fs::MetadataExt;
    if st_tmp.dev() == st_shm.dev() {
        return eprintln!("SKIP workdir_on_another_filesystem: /dev/shm is on the same fs");
    }
    let e = refuse(
        &s,
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            s.path("l1").display(),
            s.path("u").display(),
            other.display()
        ),
        &s.mnt(),
    );
    assert!(e.contains("same filesystem"), "{e}");
}

#[test]
fn workdir_and_upperdir_nested() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("u/w")).unwrap();
    std::fs::create_dir(s.path("w/u")).unwrap();
    for (u, w) in [("u", "u/w"), ("w/u", "w")] {
        let e = refuse(
            &s,
            &format!(
                "lowerdir={},upperdir={},workdir={}",
                s.path("l1").display(),
                s.path(u).display(),
                s.path(w).display()
            ),
            &s.mnt(),
        );
        assert!(e.contains("must not contain each other"), "{e}");
    }
}

#[test]
fn mountpoint_is_or_inside_or_above_a_layer() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("l1/inner")).unwrap();
    // The mountpoint is a lower layer, lies inside one, or contains one; same for upper.
    let cases = [
        (format!("lowerdir={}", s.path("l1").display()), s.path("l1")),
        (
            format!("lowerdir={}", s.path("l1").display()),
            s.path("l1/inner"),
        ),
        (
            format!("lowerdir={}", s.path("l1/inner").display()),
            s.path("l1"),
        ),
        (
            format!(
                "lowerdir={},upperdir={},workdir={}",
                s.path("l2").display(),
                s.path("l1").display(),
                s.path("w").display()
            ),
            s.path("l1"),
        ),
    ];
    for (opts, mnt) in cases {
        let e = refuse(&s, &opts, &mnt);
        assert!(e.contains("overlaps"), "{e}");
    }
}

#[test]
fn redirect_dir_values_we_cannot_honour() {
    let s = Scratch::new();
    for v in ["bogus", "yes"] {
        let e = refuse(
            &s,
            &format!("lowerdir={},redirect_dir={v}", s.path("l1").display()),
            &s.mnt(),
        );
        assert!(e.contains("redirect_dir"), "{e}");
    }
}

#[test]
fn no_mountpoint() {
    let out = run(["-o", "lowerdir=/tmp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mountpoint"));
}

#[test]
fn version_and_help() {
    let out = run(["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("stratafs "));
    let out = run(["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("lowerdir"));
}

#[test]
fn man_page_and_completions_come_from_the_cli_definitions() {
    let man = run(["--man"]);
    assert!(man.status.success());
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(text.contains(".TH stratafs 1"), "not a man page");
    assert!(text.contains("uidmapping") && text.contains("lowerdir"));
    for (page, marker) in [
        ("run", "\\-\\-lower"),
        ("image", "import"),
        ("commit", "\\-\\-from"),
    ] {
        let out = run(["--man", page]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!(".TH stratafs-{page} 1")),
            "{page}"
        );
        assert!(text.contains(marker), "{page}: {marker}");
    }
    for (shell, marker) in [
        ("bash", "_stratafs()"),
        ("zsh", "#compdef stratafs"),
        ("fish", "complete -c stratafs"),
    ] {
        let out = run(["--completions", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(marker),
            "{shell}"
        );
    }
    let bad = run(["--completions", "tcsh"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tcsh"));
    // Not mixed with a mount.
    assert!(!run(["--man", "-o", "lowerdir=/", "/mnt"]).status.success());
}

#[test]
fn install_puts_binary_man_page_and_completions_in_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install");
    let out = std::process::Command::new(script)
        .arg("--prefix")
        .arg(dir.path())
        .arg("--binary")
        .arg(crate::support::bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "bin/stratafs",
        "share/man/man1/stratafs.1",
        "share/man/man1/stratafs-run.1",
        "share/man/man1/stratafs-image.1",
        "share/man/man1/stratafs-commit.1",
        "share/bash-completion/completions/stratafs",
        "share/zsh/site-functions/_stratafs",
        "share/fish/vendor_completions.d/stratafs.fish",
    ] {
        let len = std::fs::metadata(dir.path().join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
}
