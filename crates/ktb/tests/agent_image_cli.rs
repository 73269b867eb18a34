//! `ktb agent image export` as a cluster admin runs it: the built binary,
//! placed as a release archive places it (with or without `ktb-agent`
//! beside it), writing into a temporary directory. What the archive holds
//! is tested where it is written, in `ktb-image`.

use std::path::{Path, PathBuf};
use std::process::Output;

/// A stand-in for a static aarch64 Linux `ktb-agent`: an ELF header
/// (64-bit, little-endian, machine 183) and a body.
fn fake_agent(path: &Path) {
    let mut elf = vec![0u8; 20];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    elf.extend_from_slice(b"the agent");
    std::fs::write(path, elf).expect("writes the fake agent");
}

/// A copy of the built `ktb` alone in `dir`, as if unpacked from a release
/// archive there (a hard link where the file system allows: it is large).
fn installed_ktb(dir: &Path) -> PathBuf {
    let ktb = dir.join("ktb");
    let built = env!("CARGO_BIN_EXE_ktb");
    if std::fs::hard_link(built, &ktb).is_err() {
        std::fs::copy(built, &ktb).expect("copies ktb");
    }
    ktb
}

fn export(ktb: &Path, cwd: &Path, args: &[&str]) -> Output {
    std::process::Command::new(ktb)
        .args(["agent", "image", "export"])
        .args(args)
        .current_dir(cwd)
        .env("KTB_CONFIG", cwd.join("no-config.toml"))
        .output()
        .expect("runs ktb")
}

fn temp_dir() -> tempfile::TempDir {
    // Beside the build, so `installed_ktb` can hard-link.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

#[test]
fn the_agent_beside_ktb_is_exported_under_the_default_name() {
    let dir = temp_dir();
    let ktb = installed_ktb(dir.path());
    fake_agent(&dir.path().join("ktb-agent"));
    let output = export(&ktb, dir.path(), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");

    let version = env!("CARGO_PKG_VERSION");
    let file = format!("ktb-agent-{version}.tar");
    let archive = std::fs::read(dir.path().join(&file)).expect("the archive");
    let image = format!("ghcr.io/ktb-dev/ktb-agent:{version}");
    assert!(
        stdout.starts_with(&format!("wrote {file}: {image} (linux/arm64, sha256:")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "skopeo copy oci-archive:{file} docker://REGISTRY/ktb-agent:{version}"
        )),
        "{stdout}"
    );
    let named = format!("\"io.containerd.image.name\":\"{image}\"");
    assert!(archive.windows(named.len()).any(|w| w == named.as_bytes()));
}

#[test]
fn a_binary_and_a_name_given_make_the_mirrors_archive() {
    let dir = temp_dir();
    let agent = dir.path().join("downloaded-agent");
    fake_agent(&agent);
    let mirror = "registry.example.com/tools/ktb-agent:0.1.0";
    let output = export(
        Path::new(env!("CARGO_BIN_EXE_ktb")),
        dir.path(),
        &[
            "--agent-binary",
            agent.to_str().unwrap(),
            "--tag",
            mirror,
            "-o",
            "mirror.tar",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(dir.path().join("mirror.tar").is_file());
    assert!(
        stdout.contains(&format!("docker://{mirror}\n"))
            && stdout.contains(&format!("ktb config set agent-image {mirror}\n")),
        "{stdout}"
    );
}

#[test]
fn a_missing_agent_binary_is_an_error_naming_the_flag() {
    let dir = temp_dir();
    let ktb = installed_ktb(dir.path());
    let beside = format!(
        "no ktb-agent beside this ktb, at {}",
        dir.path().join("ktb-agent").display()
    );
    for (args, says) in [
        (&[][..], beside.as_str()),
        (
            &["--agent-binary", "nowhere/ktb-agent"],
            "no agent binary at nowhere/ktb-agent",
        ),
    ] {
        let output = export(&ktb, dir.path(), args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stderr.contains("--agent-binary PATH"), "{args:?}: {stderr}");
    }
    let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(written.len(), 1, "only ktb itself: {written:?}");
}

#[test]
fn a_macos_or_windows_binary_is_refused_for_what_it_is() {
    let dir = temp_dir();
    let not_linux = dir.path().join("ktb-agent.exe");
    std::fs::write(&not_linux, b"MZ\x90\x00 a Windows program").unwrap();
    let output = export(
        Path::new(env!("CARGO_BIN_EXE_ktb")),
        dir.path(),
        &["--agent-binary", not_linux.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not an ELF executable"), "{stderr}");
}
