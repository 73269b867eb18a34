//! Registry-free container images: `scratch` images holding a few static
//! binaries, written as OCI image-layout tar archives that
//! `ctr -n k8s.io images import` loads straight into the cluster's
//! containerd. The test cluster must never pull, and a full image toolchain
//! (buildah, docker) is not needed for "one static binary, one entrypoint".
//!
//! Archives are deterministic (zero mtimes, root ownership, sorted entries),
//! so the same binaries always give the same image digest.

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One image: files at the root of an otherwise empty filesystem.
pub struct Image<'a> {
    /// Full reference, e.g. `ktb.test/pause:dev`.
    pub reference: &'a str,
    /// (path inside the image, file on this machine), all mode 0755.
    pub files: Vec<(&'a str, PathBuf)>,
    pub entrypoint: &'a [&'a str],
    /// Numeric user; `0` for root.
    pub user: u32,
}

/// Write `image` as an OCI layout archive at `out`.
pub fn write_archive(image: &Image, out: &Path) -> Result<()> {
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, src) in &image.files {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        files.push((name.trim_start_matches('/'), data));
    }
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut layer = Tar::default();
    for (name, data) in &files {
        layer.file(name, 0o755, data);
    }
    let layer = layer.finish();
    let layer_digest = sha256(&layer);

    let tag = image
        .reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "User": image.user.to_string(),
            "Env": ["PATH=/"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": image.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let mut archive = Tar::default();
    archive.dir("blobs", 0o755);
    archive.dir("blobs/sha256", 0o755);
    for (digest, blob) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        archive.file(&format!("blobs/sha256/{hex}"), 0o644, blob);
    }
    archive.file("index.json", 0o644, &index);
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, archive.finish())?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A minimal ustar writer: regular files and directories, root-owned, mtime 0.
#[derive(Default)]
struct Tar {
    buf: Vec<u8>,
}

impl Tar {
    fn dir(&mut self, name: &str, mode: u32) {
        self.entry(&format!("{name}/"), mode, b'5', &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, mode, b'0', data);
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, data: &[u8]) {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0); // uid
        octal(&mut h[116..124], 0); // gid
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0); // mtime
        h[148..156].fill(b' ');
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

/// NUL-terminated, zero-padded octal, as ustar numeric fields are.
fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}
