//! `stratafs image`: imports of OCI layouts, OCI archives and docker archives built here
//! byte by byte (so hostile ones can be made too), the store's sharing, removal and damage
//! checks, and the imported image run with `stratafs run --image` and mounted with
//! `stratafs mount --image`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

use crate::support::{bin, can_mount, is_mounted};

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One tar entry, with its name written raw (hostile names included).
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, kind, data, link, mode): (&str, tar::EntryType, &[u8], Option<&str>, u32) =
            match e {
                E::Dir(n) => (n, tar::EntryType::Directory, b"", None, 0o755),
                E::File(n, d, m) => (n, tar::EntryType::Regular, d, None, *m),
                E::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t), 0o777),
                E::Hardlink(n, t) => (n, tar::EntryType::Link, b"", Some(t), 0o644),
            };
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// The busybox base layer and a top layer that overrides and deletes.
fn base_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    tar_of(&[
        E::Dir("bin/"),
        E::File("bin/busybox", &busybox, 0o755),
        E::Symlink("bin/sh", "busybox"),
        E::Symlink("bin/cat", "busybox"),
        E::Symlink("bin/ls", "busybox"),
        E::Symlink("bin/test", "busybox"),
        E::Dir("etc/"),
        E::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        E::File("etc/motd", b"base\n", 0o644),
        E::Dir("data/"),
        E::File("data/gone", b"deleted above\n", 0o644),
        E::Hardlink("data/gone-link", "data/gone"),
    ])
}

fn top_layer(marker: &str) -> Vec<u8> {
    tar_of(&[
        E::Dir("etc/"),
        E::File("etc/motd", b"top\n", 0o644),
        E::Dir("data/"),
        E::File("data/.wh.gone", b"", 0o644),
        E::Dir("app/"),
        E::File("app/marker", marker.as_bytes(), 0o644),
    ])
}

/// Image config for `layers` (uncompressed tars, bottom first).
fn config_for(layers: &[Vec<u8>], cmd: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=hello"],
            "Cmd": ["sh", "-c", cmd],
            "WorkingDir": "/app",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap()
}

/// Writes an OCI layout in `dir`: gzip layer blobs, config, manifest, index.json.
/// `tamper` may edit the manifest JSON before it is written.
fn oci_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    config: &[u8],
    name: &str,
    tamper: impl Fn(&mut serde_json::Value),
) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        (d, bytes.len())
    };
    let (cd, cs) = put(config);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let (d, s) = put(&gzip(l));
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
        })
        .collect();
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layer_descs,
    });
    tamper(&mut manifest);
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A docker archive (`docker save` legacy layout) with uncompressed layers.
fn docker_archive(path: &Path, layers: &[Vec<u8>], config: &[u8], tag: &str) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let config_name = format!("{}.json", &sha(config)[7..]);
    add(&config_name, config);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("layer{i}/layer.tar");
        add(&n, l);
        names.push(n);
    }
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
}

/// Tar of a directory's files (an OCI archive from a layout).
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    std::fs::write(out, b.into_inner().unwrap()).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        if !Path::new("/bin/busybox").exists() {
            eprintln!("SKIP {test}: /bin/busybox is missing (Debian package busybox-static)");
            return None;
        }
        Some(Fixture {
            dir: tempfile::Builder::new()
                .prefix("stratafs-img-")
                .tempdir()
                .unwrap(),
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn image(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("image")
            .arg("--root")
            .arg(self.path("store"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.image(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn count(&self, rel: &str) -> usize {
        std::fs::read_dir(self.path(rel)).map_or(0, |d| d.count())
    }
}

#[test]
fn image_formats_import_share_layers_run_and_remove() {
    let Some(f) = Fixture::new("image_formats_import_share_layers_run_and_remove") else {
        return;
    };
    let layers = vec![base_layer(), top_layer("one")];
    let cmd = "echo $GREETING; cat /etc/motd; pwd; test ! -e /data/gone && cat /data/gone-link";
    let config = config_for(&layers, cmd);
    oci_layout(&f.path("layout"), &layers, &config, "demo:1", |_| {});
    let id = f.ok(&["import", f.path("layout").to_str().unwrap()]);
    assert_eq!(
        id.trim(),
        sha(&config),
        "the image id is the config's digest"
    );
    // The same image as an OCI archive and as a docker archive: one image, one copy of layers.
    tar_dir(&f.path("layout"), &f.path("oci.tar"));
    assert_eq!(
        f.ok(&[
            "import",
            f.path("oci.tar").to_str().unwrap(),
            "--tag",
            "again"
        ])
        .trim(),
        sha(&config)
    );
    docker_archive(
        &f.path("docker.tar"),
        &layers,
        &config,
        "docker.io/lib/demo:2",
    );
    assert_eq!(
        f.ok(&["import", f.path("docker.tar").to_str().unwrap()])
            .trim(),
        sha(&config)
    );
    assert_eq!(f.count("store/layers"), 4, "2 layer dirs + 2 records");
    let ls = f.ok(&["ls", "--json"]);
    assert_eq!(ls.lines().count(), 1);
    for n in ["demo:1", "again:latest", "docker.io/lib/demo:2"] {
        assert!(ls.contains(n), "{n}: {ls}");
    }
    // Run it: layers, whiteout, hard link, Env, Cmd, WorkingDir from the config.
    if can_mount("image_formats_import_share_layers_run_and_remove") {
        let out = Command::new(bin())
            .args(["run", "--root"])
            .arg(f.path("store"))
            .args(["--image", "demo:1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello\ntop\n/app\ndeleted above\n"
        );
        // mount --image, read-only.
        let m = f.path("mnt");
        std::fs::create_dir(&m).unwrap();
        let out = Command::new(bin())
            .args(["mount", "--image", "again", "--root"])
            .arg(f.path("store"))
            .arg(&m)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(m.join("app/marker")).unwrap(),
            "one"
        );
        assert!(
            std::fs::write(m.join("x"), "x").is_err(),
            "read-only without --upper"
        );
        assert!(Command::new("umount").arg(&m).status().unwrap().success());
        assert!(!is_mounted(&m));
    }
    // A second image sharing the base layer.
    let layers2 = vec![base_layer(), top_layer("two")];
    let config2 = config_for(&layers2, "cat /app/marker");
    oci_layout(&f.path("layout2"), &layers2, &config2, "other:1", |_| {});
    f.ok(&["import", f.path("layout2").to_str().unwrap()]);
    assert_eq!(f.count("store/layers"), 6, "the base layer is stored once");
    // rm: names first, then the image; a layer goes only when no image uses it.
    assert_eq!(f.ok(&["rm", "demo:1"]).trim(), "untagged demo:1");
    f.ok(&["rm", "again", "docker.io/lib/demo:2"]);
    assert_eq!(
        f.count("store/layers"),
        4,
        "the shared base stays with the other image"
    );
    f.ok(&["rm", "other:1"]);
    assert_eq!(f.count("store/layers"), 0);
    let out = f.image(&["inspect", "other:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such image"));
    // prune: an image whose name moved to another image is dangling and goes, with the
    // layers only it used; a named image stays.
    f.ok(&[
        "import",
        f.path("layout").to_str().unwrap(),
        "--tag",
        "keep:1",
    ]);
    f.ok(&[
        "import",
        f.path("layout2").to_str().unwrap(),
        "--tag",
        "moving:1",
    ]);
    let third = vec![base_layer(), top_layer("three")];
    oci_layout(
        &f.path("layout3"),
        &third,
        &config_for(&third, "true"),
        "x:1",
        |_| {},
    );
    f.ok(&[
        "import",
        f.path("layout3").to_str().unwrap(),
        "--tag",
        "moving:1",
    ]);
    assert_eq!(f.ok(&["ls", "--json"]).lines().count(), 3);
    let pruned = f.ok(&["prune"]);
    assert!(pruned.contains("deleted sha256:"), "{pruned}");
    let ls = f.ok(&["ls", "--json"]);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(ls.contains("keep:1") && ls.contains("moving:1"));
    assert_eq!(
        f.count("store/layers"),
        6,
        "base + two tops, dirs and records"
    );
}

#[test]
fn image_hostile_and_broken_inputs_are_refused_and_leave_nothing() {
    let Some(f) = Fixture::new("image_hostile_and_broken_inputs_are_refused_and_leave_nothing")
    else {
        return;
    };
    let outside = f.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let out_s = outside.to_str().unwrap().to_string();
    let climb = format!("../../../../../../../..{out_s}/pwned");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar_of(&[E::File(&climb, b"x", 0o644)]),
            "climbs out",
        ),
        (
            "absolute",
            tar_of(&[E::File(&format!("{out_s}/pwned"), b"x", 0o644)]),
            "absolute name",
        ),
        (
            "through-symlink",
            tar_of(&[E::Symlink("esc", &out_s), E::File("esc/pwned", b"x", 0o644)]),
            "symbolic link",
        ),
        (
            "hardlink-out",
            tar_of(&[E::Hardlink("pw", "/etc/passwd")]),
            "absolute name",
        ),
        (
            "hardlink-via-symlink",
            tar_of(&[E::Symlink("etc", "/etc"), E::Hardlink("pw", "etc/passwd")]),
            "hard link target",
        ),
    ];
    for (what, layer, expect) in &cases {
        let layers = vec![layer.clone()];
        let dir = f.path(&format!("bad-{what}"));
        oci_layout(&dir, &layers, &config_for(&layers, "true"), "bad:1", |_| {});
        let out = f.image(&["import", dir.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(expect), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
    }
    // Integrity: a layer blob that is not what the manifest says, a diff id that does not
    // match, a truncated stream, malformed JSON.
    let layers = vec![top_layer("x")];
    let good_config = config_for(&layers, "true");
    let wrong_layer = |m: &mut serde_json::Value| {
        m["layers"][0]["digest"] = serde_json::json!(sha(b"something else"));
    };
    oci_layout(
        &f.path("bad-digest"),
        &layers,
        &good_config,
        "bad:2",
        wrong_layer,
    );
    // The real blob stored under the name the manifest claims.
    let blobs = f.path("bad-digest/blobs/sha256");
    let real = gzip(&layers[0]);
    std::fs::rename(
        blobs.join(&sha(&real)[7..]),
        blobs.join(&sha(b"something else")[7..]),
    )
    .unwrap();
    let bad_diff = config_for(&[top_layer("other content")], "true");
    oci_layout(&f.path("bad-diffid"), &layers, &bad_diff, "bad:3", |_| {});
    oci_layout(&f.path("truncated"), &layers, &good_config, "bad:4", |_| {});
    let blob = gzip(&layers[0]);
    let blob_path = f.path("truncated/blobs/sha256").join(&sha(&blob)[7..]);
    std::fs::write(&blob_path, &blob[..blob.len() / 2]).unwrap();
    oci_layout(&f.path("bad-json"), &layers, &good_config, "bad:5", |_| {});
    std::fs::write(f.path("bad-json/index.json"), b"{\"manifests\": [").unwrap();
    for (what, expect) in [
        ("bad-digest", "digest mismatch"),
        ("bad-diffid", "digest mismatch"),
        ("truncated", "bytes, the manifest says"),
        ("bad-json", "malformed JSON"),
    ] {
        let out = f.image(&["import", f.path(what).to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(expect), "{what}: {err}");
    }
    // A truncated stream whose size is not recorded (docker archive): a corrupt archive.
    let cut = &layers[0][..layers[0].len() - 1500];
    docker_archive(&f.path("cut.tar"), &[cut.to_vec()], &good_config, "cut:1");
    let out = f.image(&["import", f.path("cut.tar").to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing escaped, nothing half-imported, no scratch left.
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(f.count("store/layers"), 0);
    assert_eq!(f.count("store/images"), 0);
    assert_eq!(f.count("store/tmp"), 0);
}

#[test]
fn image_concurrent_imports_crash_leftovers_and_damage() {
    let Some(f) = Fixture::new("image_concurrent_imports_crash_leftovers_and_damage") else {
        return;
    };
    let mut children = Vec::new();
    for i in 0..3 {
        let layers = vec![base_layer(), top_layer(&format!("n{i}"))];
        let dir = f.path(&format!("l{i}"));
        oci_layout(
            &dir,
            &layers,
            &config_for(&layers, "true"),
            &format!("img:{i}"),
            |_| {},
        );
        children.push(
            Command::new(bin())
                .args(["image", "--root"])
                .arg(f.path("store"))
                .arg("import")
                .arg(&dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let layer_dirs = std::fs::read_dir(f.path("store/layers"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(layer_dirs, 4, "one base + three tops");
    // What a killed import leaves in tmp/ is removed by the next command.
    std::fs::create_dir_all(f.path("store/tmp/layer-dead/etc")).unwrap();
    f.ok(&["ls"]);
    assert_eq!(f.count("store/tmp"), 0);
    // An edited metadata file is reported, not trusted.
    let rec = std::fs::read_dir(f.path("store/images"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&rec)
        .unwrap()
        .replace("img:", "evil:");
    std::fs::write(&rec, text).unwrap();
    let out = f.image(&["ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

#[test]
fn image_commit_then_export_round_trip() {
    let Some(f) = Fixture::new("image_commit_then_export_round_trip") else {
        return;
    };
    if !can_mount("image_commit_then_export_round_trip") {
        return;
    }
    let layers = vec![base_layer(), top_layer("one")];
    oci_layout(
        &f.path("layout"),
        &layers,
        &config_for(&layers, "true"),
        "demo:1",
        |_| {},
    );
    f.ok(&["import", f.path("layout").to_str().unwrap()]);
    let upper = f.path("upper");
    // Every kind of change: modified file, whiteout, metadata-only copy-up (chmod), renamed
    // lower directory (redirect), directory replaced by an empty one (opaque), hard link.
    let mutate = "echo changed > /etc/motd && rm /bin/ls && chmod 600 /etc/passwd \
                  && mv /data /moved && rm -rf /app && mkdir /app && echo x > /app/new \
                  && /bin/busybox ln /moved/gone-link /moved/third";
    let run = |store: &str, image: &str, script: &str| {
        let out = Command::new(bin())
            .args(["run", "--root"])
            .arg(f.path(store))
            .args(["--image", image, "--", "/bin/sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = Command::new(bin())
        .args(["run", "--root"])
        .arg(f.path("store"))
        .args([
            "--upper",
            upper.to_str().unwrap(),
            "--image",
            "demo:1",
            "--",
            "/bin/sh",
            "-c",
            mutate,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = Command::new(bin())
        .args([
            "commit",
            upper.to_str().unwrap(),
            "--from",
            "demo:1",
            "--tag",
            "demo:2",
            "-m",
            "changes",
            "--root",
        ])
        .arg(f.path("store"))
        .output()
        .unwrap();
    assert!(
        id.status.success(),
        "{}",
        String::from_utf8_lossy(&id.stderr)
    );
    let check = "cat /etc/motd; /bin/busybox stat -c %a /etc/passwd; ls -A /app; \
                 test -e /bin/ls || echo ls-gone; test -e /data || echo data-gone; ls /moved; \
                 test /moved/gone-link -ef /moved/third && echo linked";
    let want = "changed\n600\nnew\nls-gone\ndata-gone\ngone-link\nthird\nlinked\n";
    assert_eq!(run("store", "demo:2", check), want);
    let inspect = f.ok(&["inspect", "demo:2"]);
    assert!(inspect.contains("\"comment\": \"changes\""), "{inspect}");
    // Export, then import the export into another store: the same image runs the same.
    let archive = f.path("demo2.tar");
    f.ok(&["export", "demo:2", "-o", archive.to_str().unwrap()]);
    let out = Command::new(bin())
        .args(["image", "--root"])
        .arg(f.path("store2"))
        .args(["import", archive.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run("store2", "demo:2", check), want);
    // Exporting twice gives the same archive content (layers are archived sorted).
    let again = f.path("again.tar");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    f.ok(&["export", "demo:2", "-o", again.to_str().unwrap()]);
    // (A second apart at least, so scratch file times would show.)
    let same = std::fs::read(&archive).unwrap() == std::fs::read(&again).unwrap();
    assert!(same, "two exports of one image differ");
    // Bad input: one line, status 1.
    for args in [
        vec![
            "commit",
            "/nonexistent-upper",
            "--from",
            "demo:1",
            "--tag",
            "x",
        ],
        vec![
            "commit",
            upper.to_str().unwrap(),
            "--from",
            "nosuch",
            "--tag",
            "x",
        ],
    ] {
        let out = Command::new(bin())
            .args(&args)
            .arg("--root")
            .arg(f.path("store"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
}

/// A layout whose index lists one manifest per architecture (zstd layers for arm64).
fn oci_multi_platform(dir: &Path, variants: &[(&str, Vec<Vec<u8>>)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        (d, bytes.len())
    };
    let mut manifests = Vec::new();
    for (arch, layers) in variants {
        let config = config_for(layers, "cat /app/marker");
        let (cd, cs) = put(&config);
        let descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                let (blob, media) = if *arch == "arm64" {
                    let z = ruzstd::encoding::compress_to_vec(
                        &l[..],
                        ruzstd::encoding::CompressionLevel::Fastest,
                    );
                    (z, "application/vnd.oci.image.layer.v1.tar+zstd")
                } else {
                    (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip")
                };
                let (d, s) = put(&blob);
                serde_json::json!({"mediaType": media, "digest": d, "size": s})
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs,
        });
        let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "platform": {"os": "linux", "architecture": arch},
        }));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn image_multi_platform_index_and_zstd_layers() {
    let Some(f) = Fixture::new("image_multi_platform_index_and_zstd_layers") else {
        return;
    };
    let dir = f.path("multi");
    oci_multi_platform(
        &dir,
        &[
            ("arm64", vec![base_layer(), top_layer("arm")]),
            ("amd64", vec![base_layer(), top_layer("amd")]),
        ],
    );
    let marker = |tag: &str| {
        let img = f.ok(&["inspect", tag]);
        let top = img
            .lines()
            .rfind(|l| l.contains("\"directory\""))
            .unwrap()
            .split('"')
            .nth(3)
            .unwrap()
            .to_string();
        std::fs::read_to_string(Path::new(&top).join("app/marker")).unwrap()
    };
    f.ok(&[
        "import",
        dir.to_str().unwrap(),
        "--tag",
        "multi:amd",
        "--platform",
        "linux/amd64",
    ]);
    assert_eq!(marker("multi:amd"), "amd");
    // zstd-compressed layers, picked with --platform.
    f.ok(&[
        "import",
        dir.to_str().unwrap(),
        "--tag",
        "multi:arm",
        "--platform",
        "linux/arm64",
    ]);
    assert_eq!(marker("multi:arm"), "arm");
    let out = f.image(&["import", dir.to_str().unwrap(), "--platform", "linux/s390x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("no image for platform linux/s390x") && err.contains("linux/arm64"),
        "{err}"
    );
}
