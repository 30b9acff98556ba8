//! `stratafs run`: containers on a real union mount, as root and rootless (root inside a user
//! namespace made with `unshare -Ur`, where the launcher's FUSE mount, namespaces and mounts
//! all happen without host privileges). The image is a busybox layer under a layer that
//! overrides and deletes files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{bin, can_mount, wait_for};

/// How the launcher is started.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Root,
    /// Inside `unshare -Ur` (root mapped to the caller, no capabilities on the host).
    Userns,
}

const MODES: [Mode; 2] = [Mode::Root, Mode::Userns];

/// Two layers (top, base with busybox), a state root, and scratch space.
struct Image {
    dir: tempfile::TempDir,
}

impl Image {
    fn new(test: &str) -> Option<Image> {
        if !can_mount(test) {
            return None;
        }
        if !Path::new("/bin/busybox").exists() {
            eprintln!("SKIP {test}: /bin/busybox is missing (Debian package busybox-static)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("stratafs-run-")
            .tempdir()
            .unwrap();
        let p = |rel: &str| dir.path().join(rel);
        for d in [
            "base/bin",
            "base/etc",
            "base/data",
            "top/etc",
            "top/data",
            "state",
            "vol",
        ] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", p("base/bin/busybox")).unwrap();
        for app in [
            "sh", "cat", "echo", "ls", "id", "hostname", "test", "sleep", "touch", "pwd", "kill",
        ] {
            std::os::unix::fs::symlink("busybox", p(&format!("base/bin/{app}"))).unwrap();
        }
        std::fs::write(
            p("base/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(p("base/etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        std::fs::write(p("base/etc/motd"), "base\n").unwrap();
        std::fs::write(p("base/data/gone"), "deleted by top\n").unwrap();
        std::fs::write(p("base/data/kept"), "kept\n").unwrap();
        std::fs::write(p("base/noexec"), "not a program\n").unwrap();
        std::fs::write(p("top/etc/motd"), "top\n").unwrap();
        std::fs::write(p("top/data/.wh.gone"), "").unwrap();
        std::fs::write(p("vol/host.txt"), "from host\n").unwrap();
        Some(Image { dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `stratafs run --root STATE --lower top --lower base ARGS...` as a command.
    fn command(&self, mode: Mode, args: &[&str]) -> Command {
        let mut cmd = match mode {
            Mode::Root => Command::new(bin()),
            Mode::Userns => {
                let mut c = Command::new("unshare");
                c.args(["-Ur", "--"]).arg(bin());
                c
            }
        };
        cmd.arg("run")
            .arg("--root")
            .arg(self.path("state"))
            .arg("--lower")
            .arg(self.path("top"))
            .arg("--lower")
            .arg(self.path("base"))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, mode: Mode, args: &[&str]) -> Output {
        self.command(mode, args).output().expect("run stratafs run")
    }

    /// Runs `sh -c SCRIPT`, asserts exit 0 and returns stdout.
    fn sh(&self, mode: Mode, opts: &[&str], script: &str) -> String {
        let mut args = opts.to_vec();
        args.extend(["--", "sh", "-c", script]);
        let out = self.run(mode, &args);
        assert!(
            out.status.success(),
            "{mode:?} {script:?}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn run_files_come_from_layers_and_writes_go_to_the_upper() {
    let Some(img) = Image::new("run_files_come_from_layers_and_writes_go_to_the_upper") else {
        return;
    };
    for mode in MODES {
        let upper = img.path(&format!("upper-{mode:?}"));
        let upper_s = upper.to_str().unwrap();
        let out = img.sh(
            mode,
            &["--upper", upper_s],
            "cat /etc/motd; cat /data/kept; test ! -e /data/gone && echo gone-hidden; \
             echo new > /new; echo more >> /etc/motd; ls /",
        );
        assert_eq!(
            out, "top\nkept\ngone-hidden\nbin\ndata\ndev\netc\nnew\nnoexec\nproc\nsys\n",
            "{mode:?}"
        );
        assert_eq!(std::fs::read_to_string(upper.join("new")).unwrap(), "new\n");
        assert_eq!(
            std::fs::read_to_string(upper.join("etc/motd")).unwrap(),
            "top\nmore\n"
        );
        assert_eq!(
            std::fs::read_to_string(img.path("top/etc/motd")).unwrap(),
            "top\n"
        );
        assert!(!img.path("top/new").exists() && !img.path("base/new").exists());
        // The host's files are not there: this scratch directory exists on the host only.
        let host_only = img.path("vol/host.txt");
        let out = img.sh(
            mode,
            &[],
            &format!(
                "test -e {} && echo visible || echo invisible",
                host_only.display()
            ),
        );
        assert_eq!(out, "invisible\n", "{mode:?}");
    }
}

#[test]
fn run_namespaces_pid1_hostname_loopback_only() {
    let Some(img) = Image::new("run_namespaces_pid1_hostname_loopback_only") else {
        return;
    };
    for mode in MODES {
        let out = img.sh(
            mode,
            &["--hostname", "box"],
            "echo $PPID; hostname; cat /etc/hostname; cat /sys/class/net/lo/flags; ls /sys/class/net; \
             (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo wrote || echo sysctl-ro; \
             cat /proc/kcore | wc -c",
        );
        // The command's parent is pid 1 (our init); lo is up (0x9 = UP|LOOPBACK) and alone;
        // root in the container cannot change host sysctls or read kernel memory.
        assert_eq!(out, "1\nbox\nbox\n0x9\nlo\nsysctl-ro\n0\n", "{mode:?}");
    }
}

#[test]
fn run_volumes_read_write_and_read_only() {
    let Some(img) = Image::new("run_volumes_read_write_and_read_only") else {
        return;
    };
    let vol = img.path("vol");
    for mode in MODES {
        let rw = format!("{}:/mnt/v", vol.display());
        let out = img.sh(
            mode,
            &["-v", &rw],
            &format!("cat /mnt/v/host.txt; echo {mode:?} > /mnt/v/from-ctr"),
        );
        assert_eq!(out, "from host\n");
        assert_eq!(
            std::fs::read_to_string(vol.join("from-ctr")).unwrap(),
            format!("{mode:?}\n")
        );
        let ro = format!("{}:/mnt/v:ro", vol.display());
        let out = img.run(
            mode,
            &["-v", &ro, "--", "sh", "-c", "echo x > /mnt/v/denied"],
        );
        assert_eq!(out.status.code(), Some(1), "{mode:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"));
        assert!(!vol.join("denied").exists());
        // --read-only: the root is read-only, a read-write volume is not.
        let out = img.run(
            mode,
            &[
                "--read-only",
                "-v",
                &rw,
                "--",
                "sh",
                "-c",
                "echo y > /mnt/v/ok && touch /x",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{mode:?}");
        assert!(vol.join("ok").exists());
    }
}

#[test]
fn run_exit_statuses() {
    let Some(img) = Image::new("run_exit_statuses") else {
        return;
    };
    for mode in MODES {
        let code = |args: &[&str]| img.run(mode, args).status.code();
        assert_eq!(code(&["--", "sh", "-c", "exit 7"]), Some(7), "{mode:?}");
        assert_eq!(
            code(&["--", "sh", "-c", "kill -TERM $$"]),
            Some(143),
            "{mode:?}"
        );
        assert_eq!(code(&["--", "no-such-command"]), Some(127), "{mode:?}");
        assert_eq!(code(&["--", "/noexec"]), Some(126), "{mode:?}");
    }
}

#[test]
fn run_refuses_bad_input_with_one_line_and_125() {
    let Some(img) = Image::new("run_refuses_bad_input_with_one_line_and_125") else {
        return;
    };
    let cases: &[&[&str]] = &[
        &["-v", "relative:/x", "--", "true"],
        &["-v", "/nonexistent-stratafs-volume:/x", "--", "true"],
        &["-v", "/tmp:/x:rx", "--", "true"],
        &["-u", "nosuchuser", "--", "true"],
        &["-u", "app:nosuchgroup", "--", "true"],
        &["--hostname", "bad name", "--", "true"],
        &["--memory", "lots", "--", "true"],
        &["--no-such-flag", "--", "true"],
    ];
    for args in cases {
        let out = img.run(Mode::Root, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(
            err.starts_with("stratafs run: ") || err.starts_with("error: "),
            "{args:?}: {err}"
        );
        if err.starts_with("stratafs run: ") {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
    }
    let out = Command::new(bin())
        .args(["run", "--root"])
        .arg(img.path("state"))
        .args(["--lower", "/nonexistent-stratafs-layer", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // Nothing was left behind by the refused runs.
    let left: Vec<_> = std::fs::read_dir(img.path("state/run"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn run_user_env_workdir_tty() {
    let Some(img) = Image::new("run_user_env_workdir_tty") else {
        return;
    };
    let env_file = img.path("env");
    std::fs::write(&env_file, "# comment\nB=from-file\n\nC=c\n").unwrap();
    let out = img.sh(
        Mode::Root,
        &[
            "-u",
            "app",
            "-e",
            "A=1",
            "-e",
            "C=override",
            "--env-file",
            env_file.to_str().unwrap(),
            "-w",
            "/work/dir",
        ],
        "id -u; id -g; echo $A $B $C $HOME; pwd; test -t 0 || echo no-tty",
    );
    assert_eq!(
        out,
        "1000\n1000\n1 from-file override /home/app\n/work/dir\nno-tty\n"
    );
    for mode in MODES {
        let out = img.sh(mode, &["-t"], "test -t 0 && test -t 1 && echo tty");
        assert_eq!(out.trim_end(), "tty", "{mode:?}");
    }
}

#[test]
fn run_reaps_orphans_and_forwards_signals() {
    let Some(img) = Image::new("run_reaps_orphans_and_forwards_signals") else {
        return;
    };
    // An orphan (its parent shell exits at once) ends while the command still runs: pid 1
    // must reap it, or it stays a zombie.
    let out = img.sh(
        Mode::Root,
        &[],
        "sh -c 'sleep 0.1 &'; sleep 0.6; cat /proc/[0-9]*/stat",
    );
    let states: Vec<char> = out
        .lines()
        .filter_map(|l| {
            l.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .collect();
    assert!(!states.is_empty());
    assert!(!states.contains(&'Z'), "zombie left: {out}");
    for mode in MODES {
        let mut child = img
            .command(
                mode,
                &[
                    "--",
                    "sh",
                    "-c",
                    "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done",
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        let pid = child.id() as i32;
        // unshare(1) execs the launcher, so the pid is the launcher's in both modes.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(42), "{mode:?}");
    }
}

#[test]
fn run_sigkill_leaves_nothing_mounted_and_next_run_cleans_up() {
    let Some(img) = Image::new("run_sigkill_leaves_nothing_mounted_and_next_run_cleans_up") else {
        return;
    };
    let runs = img.path("state/run");
    for mode in MODES {
        let mut child = img
            .command(mode, &["--", "sh", "-c", "echo ready; exec sleep 60"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        assert!(
            std::fs::read_dir(&runs).unwrap().count() >= 2,
            "run dir and lock exist"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // The daemon and the container die with the launcher.
        let top = img.path("top").display().to_string();
        let alive = || {
            std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&top))
            })
        };
        assert!(
            wait_for(Duration::from_secs(5), || !alive()),
            "{mode:?}: daemon outlived the launcher"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(img.dir.path().to_str().unwrap()),
            "{mode:?}: {mounts}"
        );
        // The next run removes the dead run's directory.
        img.sh(mode, &[], "true");
        let left: Vec<_> = std::fs::read_dir(&runs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{mode:?}: {left:?}");
    }
}

#[test]
fn run_keep_keeps_the_upper() {
    let Some(img) = Image::new("run_keep_keeps_the_upper") else {
        return;
    };
    let out = img.run(Mode::Root, &["--keep", "--", "sh", "-c", "echo kept > /k"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let path = err
        .trim()
        .strip_prefix("stratafs run: upper layer kept in ")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(
        std::fs::read_to_string(Path::new(path).join("k")).unwrap(),
        "kept\n"
    );
    assert!(path.starts_with(img.path("state/kept").to_str().unwrap()));
}

#[test]
fn run_image_symlinks_cannot_aim_mounts_at_the_host() {
    let Some(img) = Image::new("run_image_symlinks_cannot_aim_mounts_at_the_host") else {
        return;
    };
    // A hostile image: a directory symlink climbing out to a host directory, and /etc/hostname
    // pointing at a host file. Mount targets must resolve inside the container's root.
    let victim = img.path("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("file"), "host file\n").unwrap();
    let climb = format!("../../../../../../../..{}", victim.display());
    std::os::unix::fs::symlink(&climb, img.path("top/escape")).unwrap();
    std::os::unix::fs::symlink(format!("{climb}/file"), img.path("top/etc/hostname")).unwrap();
    for mode in MODES {
        let vol = format!("{}:/escape/sub", img.path("vol").display());
        let out = img.sh(
            mode,
            &["-v", &vol, "--hostname", "inside"],
            "cat /escape/sub/host.txt; cat /etc/hostname",
        );
        assert_eq!(out, "from host\ninside\n", "{mode:?}");
        let names: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("file")],
            "{mode:?}: host dir touched"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("file")).unwrap(),
            "host file\n"
        );
    }
}
