//! openEuler packaging (issue 15, acceptance 4): the RPM builds with rpmbuild and holds
//! what a service needs; its unit passes `systemd-analyze verify` without a warning; the
//! packaged binary serves with the packaged configuration.

use crate::harness::{free_port, serves_api_versions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_rpm_builds_and_what_it_installs_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rpm");
    let built = run(Command::new("bash")
        .arg(root.join("scripts/build-rpm.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_slipstream"), "--out"])
        .arg(&out)
        .stderr(Stdio::null()));
    let rpm = built.lines().last().expect("the RPM's path").to_string();
    let q = |args: &[&str]| run(Command::new("rpm").args(args).arg(&rpm));
    let info = q(&["-qp", "--queryformat", "%{NAME} %{VERSION} %{LICENSE} %{ARCH}"]);
    assert_eq!(info, format!("slipstream {} Apache-2.0 x86_64", env!("CARGO_PKG_VERSION")));
    let files = q(&["-qlp"]);
    println!("{rpm}:\n{files}");
    for f in [
        "/usr/bin/slipstream",
        "/usr/lib/systemd/system/slipstream.service",
        "/etc/slipstream/slipstream.toml",
        "/var/lib/slipstream",
        "/usr/share/doc/slipstream/README.md",
        "/usr/share/doc/slipstream/ustack.md",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the RPM:\n{files}");
    }
    assert_eq!(q(&["-qcp"]).trim(), "/etc/slipstream/slipstream.toml", "the configuration is a %config file");
    let scripts = q(&["-qp", "--scripts"]);
    assert!(scripts.contains("useradd -r -g slipstream"), "no service user made at install:\n{scripts}");
    // Owners and modes: the data directory is the service user's, the configuration
    // readable by its group only.
    let modes = q(&["-qp", "--queryformat", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILENAMES}\n]"]);
    assert!(modes.lines().any(|l| l == "drwxr-x--- slipstream slipstream /var/lib/slipstream"), "{modes}");
    assert!(modes.lines().any(|l| l == "-rw-r----- root slipstream /etc/slipstream/slipstream.toml"), "{modes}");

    // What it installs, unpacked.
    let tree = dir.path().join("root");
    std::fs::create_dir_all(&tree).expect("mkdir");
    run(Command::new("sh").arg("-c").arg(format!("rpm2cpio '{rpm}' | cpio -idm --quiet")).current_dir(&tree));
    // The unit, verified by systemd against this host's units, with ExecStart pointing at
    // the unpacked binary (verify checks that it is executable). A warning is a failure:
    // verify says "ignoring" and exits 0 for unknown keys and bad values.
    let unit = std::fs::read_to_string(tree.join("usr/lib/systemd/system/slipstream.service")).expect("unit");
    let bin = tree.join("usr/bin/slipstream");
    let local = dir.path().join("slipstream.service");
    std::fs::write(&local, unit.replace("/usr/bin/slipstream", &bin.to_string_lossy())).expect("write unit");
    let v = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&local).output().expect("systemd-analyze");
    let complaints = String::from_utf8_lossy(&v.stderr).to_string() + &String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success() && complaints.trim().is_empty(), "systemd-analyze verify:\n{complaints}");
    for want in [
        "LimitNOFILE=",
        "LimitMEMLOCK=infinity",
        "CAP_BPF",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "Restart=on-failure",
        "User=slipstream",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }

    // The packaged binary with the packaged configuration (its listener and data directory
    // overridden by flags, which win over the file).
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(tree.join("etc/slipstream/slipstream.toml"))
        .args(["--listen", &addr.to_string(), "--data-dir"])
        .arg(dir.path().join("data"))
        .stderr(Stdio::null())
        .spawn()
        .expect("packaged slipstream");
    let started = Instant::now();
    while !serves_api_versions(addr) {
        assert!(child.try_wait().expect("wait").is_none(), "the packaged broker exited at start");
        assert!(started.elapsed() < Duration::from_secs(20), "the packaged broker did not serve");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert!(child.wait().expect("wait").success(), "the packaged broker did not stop cleanly on SIGTERM");
}
