//! The life of a mount: background start only once live, reads, EROFS without an upper
//! layer, and every way of unmounting (fusermount3 -u, umount, SIGTERM, SIGINT), plus the
//! `mount -t fuse.stratafs` helper path and an fstab line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Scratch, bin, can_mount, is_mounted, run, wait_for};

/// PIDs of stratafs daemons serving `mnt`.
fn daemons_for(mnt: &Path) -> Vec<u32> {
    let want = mnt.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("stratafs")) && args.contains(&want) {
            out.push(pid);
        }
    }
    out
}

fn layers_with_override(s: &Scratch) {
    s.write("l2/a", "lower");
    s.write("l1/a", "top");
    s.write("l2/d/x", "x");
    s.write("l1/d/y", "y");
}

#[test]
fn read_only_mount_reads_and_refuses_every_write() {
    if !can_mount("read_only_mount_reads_and_refuses_every_write") {
        return;
    }
    let s = Scratch::new();
    layers_with_override(&s);
    s.mount(false);
    let m = s.mnt();
    assert_eq!(std::fs::read_to_string(m.join("a")).unwrap(), "top");
    let mut names: Vec<_> = std::fs::read_dir(m.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["x", "y"]);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(std::fs::write(m.join("new"), "x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("a"))
            .map(drop),
        "open for write",
    );
    erofs(std::fs::create_dir(m.join("nd")), "mkdir");
    erofs(std::fs::remove_file(m.join("a")), "unlink");
    erofs(std::fs::remove_dir(m.join("d")), "rmdir");
    erofs(std::fs::rename(m.join("a"), m.join("b")), "rename");
    erofs(std::os::unix::fs::symlink("a", m.join("sl")), "symlink");
    erofs(std::fs::hard_link(m.join("a"), m.join("hl")), "link");
    use std::os::unix::fs::PermissionsExt;
    erofs(
        std::fs::set_permissions(m.join("a"), std::fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    erofs(
        rustix::fs::setxattr(m.join("a"), "user.x", b"1", rustix::fs::XattrFlags::empty())
            .map_err(Into::into),
        "setxattr",
    );
    // Nothing reached the lower layers.
    assert_eq!(std::fs::read_to_string(s.path("l1/a")).unwrap(), "top");
    assert!(!s.path("l1/new").exists());
}

#[test]
fn fusermount_unmount_ends_the_daemon() {
    if !can_mount("fusermount_unmount_ends_the_daemon") {
        return;
    }
    let s = Scratch::new();
    layers_with_override(&s);
    s.mount(true);
    let m = s.mnt();
    assert_eq!(daemons_for(&m).len(), 1, "one daemon in the background");
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&m)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(&m));
    assert!(
        wait_for(Duration::from_secs(5), || daemons_for(&m).is_empty()),
        "daemon still running after fusermount3 -u"
    );
}

#[test]
fn umount_ends_the_daemon() {
    if !can_mount("umount_ends_the_daemon") {
        return;
    }
    let s = Scratch::new();
    layers_with_override(&s);
    s.mount(false);
    let m = s.mnt();
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
    assert!(
        wait_for(Duration::from_secs(5), || daemons_for(&m).is_empty()),
        "daemon still running after umount"
    );
}

#[test]
fn an_exiting_daemon_leaves_a_later_mount_on_the_same_path_alone() {
    if !can_mount("an_exiting_daemon_leaves_a_later_mount_on_the_same_path_alone") {
        return;
    }
    let s = Scratch::new();
    layers_with_override(&s);
    s.mount(false);
    let m = s.mnt();
    let pids = daemons_for(&m);
    assert_eq!(pids.len(), 1, "one daemon for the mount");
    let pid = pids[0] as libc::pid_t;
    // Hold the daemon still while its mount goes and another one takes the path (a container
    // restarted on the same directory), then let it see the end of its session.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Lazy: a plain umount would wait for the stopped daemon.
    let detached = Command::new("umount").arg("-l").arg(&m).status().unwrap();
    if !detached.success() {
        unsafe { libc::kill(pid, libc::SIGCONT) };
        panic!("umount -l failed");
    }
    let tmpfs = Command::new("mount")
        .args(["-t", "tmpfs", "later", m.to_str().unwrap()])
        .status()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(tmpfs.success());
    assert!(
        wait_for(Duration::from_secs(10), || daemons_for(&m).is_empty()),
        "daemon still running after umount"
    );
    let later_still_there = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == m.to_str() && l.contains(" - tmpfs "));
    let _ = Command::new("umount").arg(&m).status();
    assert!(
        later_still_there,
        "the exiting daemon unmounted the later mount"
    );
}

#[test]
fn sigterm_and_sigint_unmount_cleanly_and_exit_zero() {
    if !can_mount("sigterm_and_sigint_unmount_cleanly_and_exit_zero") {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let s = Scratch::new();
        layers_with_override(&s);
        let m = s.mnt();
        let mut child = Command::new(bin())
            .args(["-f", "-o", &s.opts(true), m.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || is_mounted(&m)),
            "not mounted"
        );
        assert_eq!(std::fs::read_to_string(m.join("a")).unwrap(), "top");
        // SAFETY-free: rustix's kill takes a checked pid.
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::from_named_raw(sig).unwrap())
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {sig}: {status:?}");
        assert!(!is_mounted(&m), "signal {sig} left the mount");
    }
}

/// Where mount(8) looks for `stratafs` when it runs mount.fuse3 (libmount resets PATH to
/// the standard one).
const INSTALLED: &str = "/usr/local/bin/stratafs";

#[test]
fn mount_fuse3_helper_calling_convention() {
    if !can_mount("mount_fuse3_helper_calling_convention") {
        return;
    }
    if !Path::new("/sbin/mount.fuse3").exists() {
        return eprintln!("SKIP mount_fuse3_helper_calling_convention: fuse3 not installed");
    }
    let s = Scratch::new();
    layers_with_override(&s);
    let m = s.mnt();
    // What `mount -t fuse.stratafs SRC MNT -o OPTS` runs: mount.fuse3, which finds
    // `stratafs` on PATH and calls it as `stratafs SRC MNT -o OPTS,dev,suid`.
    let bindir = s.path("bin");
    std::fs::create_dir(&bindir).unwrap();
    std::os::unix::fs::symlink(bin(), bindir.join("stratafs")).unwrap();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("/sbin/mount.fuse3")
        .env("PATH", &path)
        .arg("demo-src")
        .arg(&m)
        .args(["-t", "stratafs", "-o", &s.opts(true)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.fuse3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(m.join("a")).unwrap(), "top");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("demo-src ") && l.contains(" fuse.stratafs ")),
        "source and type shown in /proc/mounts"
    );
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
}

#[test]
fn mount_t_and_fstab_line_with_installed_binary() {
    if !can_mount("mount_t_and_fstab_line_with_installed_binary") {
        return;
    }
    let same = std::fs::read(INSTALLED).ok() == std::fs::read(bin()).ok();
    if !same {
        return eprintln!(
            "SKIP mount_t_and_fstab_line_with_installed_binary: {INSTALLED} is not this build \
             (install it to run this test; .ci/run does)"
        );
    }
    let s = Scratch::new();
    layers_with_override(&s);
    let m = s.mnt();
    let out = Command::new("mount")
        .args(["-t", "fuse.stratafs", "stratafs-demo"])
        .arg(&m)
        .args(["-o", &s.opts(true)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(m.join("a")).unwrap(), "top");
    assert!(Command::new("umount").arg(&m).status().unwrap().success());

    // The same through an fstab line (mount -T reads an alternative fstab).
    let fstab = s.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "stratafs-demo {} fuse.stratafs {},noauto 0 0\n",
            m.display(),
            s.opts(false)
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fstab: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(m.join("d/x")).unwrap(), "x");
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
    assert!(wait_for(Duration::from_secs(5), || daemons_for(&m).is_empty()));
}

#[test]
fn glued_and_repeated_options_and_escaped_colon() {
    if !can_mount("glued_and_repeated_options_and_escaped_colon") {
        return;
    }
    let s = Scratch::new();
    let colon = s.path("la:yer");
    std::fs::create_dir(&colon).unwrap();
    std::fs::write(colon.join("c"), "colon").unwrap();
    s.write("l1/a", "top");
    let lower = format!(
        "-olowerdir={}:{}",
        s.path("l1").display(),
        colon.display().to_string().replace(':', "\\:")
    );
    let out = run([
        lower.as_str(),
        "-o",
        "noatime",
        "-o",
        "fast_ino=1,bogus_opt",
        s.mnt().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument ignored: bogus_opt"));
    assert_eq!(std::fs::read_to_string(s.mnt().join("c")).unwrap(), "colon");
    assert_eq!(std::fs::read_to_string(s.mnt().join("a")).unwrap(), "top");
}

#[test]
fn five_hundred_lower_layers() {
    if !can_mount("five_hundred_lower_layers") {
        return;
    }
    let s = Scratch::new();
    let root = s.path("many");
    std::fs::create_dir(&root).unwrap();
    let mut lowers = Vec::new();
    for i in 0..500 {
        let d = root.join(i.to_string());
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
        std::fs::write(d.join("shared"), i.to_string()).unwrap();
        lowers.push(d.display().to_string());
    }
    let out = run([
        "-o",
        &format!("lowerdir={}", lowers.join(":")),
        s.mnt().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = s.mnt();
    assert_eq!(std::fs::read_to_string(m.join("f499")).unwrap(), "499");
    assert_eq!(
        std::fs::read_to_string(m.join("shared")).unwrap(),
        "0",
        "top layer wins"
    );
    assert_eq!(std::fs::read_dir(&m).unwrap().count(), 501);
}

#[test]
fn names_of_255_bytes() {
    if !can_mount("names_of_255_bytes") {
        return;
    }
    let s = Scratch::new();
    let long = "n".repeat(255);
    s.write(&format!("l2/{long}"), "long");
    s.mount(false);
    let m = s.mnt();
    assert_eq!(std::fs::read_to_string(m.join(&long)).unwrap(), "long");
    let e = std::fs::metadata(m.join("n".repeat(256))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
}

#[test]
fn inode_numbers_unique_across_filesystems_and_equal_to_d_ino() {
    if !can_mount("inode_numbers_unique_across_filesystems_and_equal_to_d_ino") {
        return;
    }
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let s = Scratch::new();
    // Two fresh tmpfs instances number their inodes identically: without the xino scheme the
    // merged view would show the same st_ino for different files.
    let (a, b) = (s.path("l1"), s.path("l2"));
    for d in [&a, &b] {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(d)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
    }
    struct Unmount(Vec<std::path::PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = Command::new("umount").arg("-l").arg(d).status();
            }
        }
    }
    let _guard = Unmount(vec![a.clone(), b.clone()]);
    for i in 0..100 {
        std::fs::write(a.join(format!("a{i}")), "a").unwrap();
        std::fs::write(b.join(format!("b{i}")), "b").unwrap();
    }
    let collide = (0..100).any(|i| {
        std::fs::metadata(a.join(format!("a{i}"))).unwrap().ino()
            == std::fs::metadata(b.join(format!("b{i}"))).unwrap().ino()
    });
    assert!(collide, "fixture: the two tmpfs should reuse inode numbers");
    s.mount(false);
    let mut seen = std::collections::HashMap::new();
    for e in std::fs::read_dir(s.mnt()).unwrap() {
        let e = e.unwrap();
        let st = std::fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(e.ino(), st.ino(), "d_ino != st_ino for {:?}", e.file_name());
        if let Some(prev) = seen.insert(st.ino(), e.file_name()) {
            panic!(
                "{:?} and {:?} share inode {}",
                prev,
                e.file_name(),
                st.ino()
            );
        }
    }
    assert_eq!(seen.len(), 200);
    let again = std::fs::symlink_metadata(s.mnt().join("a7")).unwrap().ino();
    assert_eq!(
        seen.get(&again).map(|n| n.to_string_lossy().into_owned()),
        Some("a7".into())
    );
    let m = s.mnt();
    assert!(Command::new("umount").arg(&m).status().unwrap().success());
}
