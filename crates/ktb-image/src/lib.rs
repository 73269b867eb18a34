//! Registry-free container images: `scratch` images holding a few static
//! Linux binaries, written as OCI image-layout tar archives.
//!
//! Two users need them and neither wants an image toolchain (Docker,
//! buildah) for "static binaries, one entrypoint": `ktb agent image
//! export`, so clusters that cannot pull the released agent image load it
//! into a registry of their own (`skopeo copy oci-archive:FILE docker://…`)
//! or a node's containerd (`ctr -n k8s.io images import FILE`); and `cargo
//! xtask cluster up`, whose test cluster imports every image and never
//! pulls. [`agent`] is the agent image both write, laid out as
//! `deploy/agent/Containerfile` lays out the released one.
//!
//! An archive holds one uncompressed layer with the files at the root (mode
//! 0755), the image config, its manifest, and `index.json` naming the image
//! for containerd (`io.containerd.image.name`) and for OCI tools
//! (`org.opencontainers.image.ref.name`, the tag). The platform is linux on
//! the architecture its executables' ELF headers name ([`Architecture`]).
//! Archives are deterministic (zero mtimes, root ownership, sorted entries),
//! so the same binaries always give the same image digest.

mod elf;
mod tar;

pub use elf::Architecture;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tar::Tar;

/// One image: static executables at the root of an otherwise empty
/// filesystem.
pub struct Image<'a> {
    /// The name the archive gives the image, e.g.
    /// `ghcr.io/ktb-dev/ktb-agent:0.1.0` or `ktb.test/pause:dev`; without a
    /// tag it is `latest`. Never a digest (`@sha256:…`): that is the
    /// archive's to compute.
    pub reference: &'a str,
    /// (path inside the image relative to its root, e.g. `ktb-agent`; the
    /// executable on this machine). All must be ELF executables of one
    /// architecture.
    pub files: Vec<(&'a str, PathBuf)>,
    /// What the container runs, e.g. `["/ktb-agent"]`.
    pub entrypoint: &'a [&'a str],
    /// The numeric user the container runs as: 65532 (distroless's
    /// "nonroot"), or 0 for root.
    pub user: u32,
}

/// What a written archive holds.
#[derive(Debug)]
pub struct Written {
    /// The architecture of the image's executables.
    pub architecture: Architecture,
    /// The manifest's digest, `sha256:` and 64 hex digits: this exact image,
    /// as `ctr images ls` shows it after an import.
    pub manifest_digest: String,
}

/// The agent's place in its image: `/ktb-agent`, run by user 65532 with no
/// shell beside it, as in `deploy/agent/Containerfile`.
const AGENT_FILE: &str = "ktb-agent";
const AGENT_ENTRYPOINT: &[&str] = &["/ktb-agent"];
const AGENT_USER: u32 = 65532;

/// The agent image named `reference`, holding the static `ktb-agent`
/// executable `binary`.
pub fn agent(reference: &str, binary: PathBuf) -> Image<'_> {
    Image {
        reference,
        files: vec![(AGENT_FILE, binary)],
        entrypoint: AGENT_ENTRYPOINT,
        user: AGENT_USER,
    }
}

/// Write `image` as an OCI layout archive at `out`, through a `.partial`
/// file beside it so `out` is either complete or absent.
pub fn write_archive(image: &Image, out: &Path) -> Result<Written> {
    let tag = tag_of(image.reference)?;
    let architecture = architecture_of(&image.files)?;
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

    let platform = json!({ "architecture": architecture.oci_name(), "os": "linux" });
    let config = serde_json::to_vec(&json!({
        "architecture": architecture.oci_name(),
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
            "platform": platform,
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

    let mut partial = OsString::from(out.as_os_str());
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, archive.finish())
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(Written {
        architecture,
        manifest_digest,
    })
}

/// The tag of `reference` (`latest` when it has none), or why the
/// reference cannot name an image.
fn tag_of(reference: &str) -> Result<&str> {
    if reference.is_empty() || reference.contains(|c: char| c == '@' || c.is_whitespace()) {
        bail!(
            "`{reference}` cannot name the image: give a name like \
             registry.example.com/ktb-agent:0.1.0, without a digest"
        );
    }
    // A colon before the last slash separates a registry's port, not a tag.
    Ok(match reference.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    })
}

/// The one architecture every file of an image is built for.
fn architecture_of(files: &[(&str, PathBuf)]) -> Result<Architecture> {
    let mut found: Option<(Architecture, &Path)> = None;
    for (_, path) in files {
        let architecture = Architecture::of_executable(path)?;
        match found {
            None => found = Some((architecture, path)),
            Some((first, first_path)) if first != architecture => bail!(
                "{} is built for {} but {} for {}: an image has one architecture",
                first_path.display(),
                first.oci_name(),
                path.display(),
                architecture.oci_name()
            ),
            Some(_) => {}
        }
    }
    found
        .map(|(architecture, _)| architecture)
        .context("an image needs at least one executable")
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use elf::{elf_header, EM_AARCH64, EM_X86_64};
    use serde_json::Value;
    use std::collections::BTreeMap;

    /// A tar archive's regular files and directories: name → (mode, content).
    /// Checks each header's checksum, as tar readers do.
    fn entries(tar: &[u8]) -> BTreeMap<String, (u32, Vec<u8>)> {
        let field = |bytes: &[u8]| {
            let text = std::str::from_utf8(bytes).unwrap();
            text.split('\0').next().unwrap().trim().to_owned()
        };
        let octal = |bytes: &[u8]| u64::from_str_radix(&field(bytes), 8).unwrap();
        let mut entries = BTreeMap::new();
        let mut at = 0;
        while tar[at..at + 512].iter().any(|&b| b != 0) {
            let header = &tar[at..at + 512];
            let mut summed = header.to_vec();
            summed[148..156].fill(b' ');
            let sum: u64 = summed.iter().map(|&b| u64::from(b)).sum();
            assert_eq!(octal(&header[148..156]), sum, "checksum");
            assert_eq!(&header[257..263], b"ustar\0");
            assert_eq!((octal(&header[108..116]), octal(&header[116..124])), (0, 0));
            let size = octal(&header[124..136]) as usize;
            let mode = octal(&header[100..108]) as u32;
            let data = tar[at + 512..at + 512 + size].to_vec();
            entries.insert(field(&header[..100]), (mode, data));
            at += 512 + size.div_ceil(512) * 512;
        }
        assert!(tar[at..].iter().all(|&b| b == 0) && tar.len() - at >= 1024);
        entries
    }

    /// A stand-in static executable for `machine`.
    fn executable(dir: &Path, name: &str, machine: u16) -> PathBuf {
        let path = dir.join(name);
        let mut content = elf_header(machine).to_vec();
        content.extend_from_slice(format!("the program of {name}").as_bytes());
        std::fs::write(&path, content).unwrap();
        path
    }

    /// The blob `digest` names, checked against that digest and `size`.
    fn blob<'a>(archive: &'a BTreeMap<String, (u32, Vec<u8>)>, descriptor: &Value) -> &'a [u8] {
        let digest = descriptor["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("sha256:").unwrap();
        let (mode, data) = &archive[&format!("blobs/sha256/{hex}")];
        assert_eq!(*mode, 0o644);
        assert_eq!(sha256(data), digest, "a blob's name is its digest");
        assert_eq!(descriptor["size"], data.len(), "size of {digest}");
        data
    }

    #[test]
    fn the_agent_archive_is_an_oci_layout_whose_digests_agree() {
        let dir = tempfile::tempdir().unwrap();
        let binary = executable(dir.path(), "ktb-agent", EM_AARCH64);
        let out = dir.path().join("agent.tar");
        let image = agent(
            "registry.example.com:5000/ktb/ktb-agent:1.2.3",
            binary.clone(),
        );
        let written = write_archive(&image, &out).unwrap();
        assert_eq!(written.architecture, Architecture::Arm64);
        assert!(!dir.path().join("agent.tar.partial").exists());

        let archive = entries(&std::fs::read(&out).unwrap());
        assert_eq!(
            archive["oci-layout"].1,
            br#"{"imageLayoutVersion":"1.0.0"}"#
        );
        assert_eq!(archive["blobs/"].0, 0o755);
        let index: Value = serde_json::from_slice(&archive["index.json"].1).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        let entry = &manifests[0];
        assert_eq!(entry["digest"], written.manifest_digest);
        assert_eq!(
            entry["platform"],
            json!({ "architecture": "arm64", "os": "linux" })
        );
        assert_eq!(
            entry["annotations"],
            json!({
                "io.containerd.image.name": "registry.example.com:5000/ktb/ktb-agent:1.2.3",
                "org.opencontainers.image.ref.name": "1.2.3",
            })
        );

        let manifest: Value = serde_json::from_slice(blob(&archive, entry)).unwrap();
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let config: Value = serde_json::from_slice(blob(&archive, &manifest["config"])).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        let layer = blob(&archive, &layers[0]);
        assert_eq!(config["rootfs"]["diff_ids"], json!([layers[0]["digest"]]));
        assert_eq!(
            (&config["architecture"], &config["os"]),
            (&"arm64".into(), &"linux".into())
        );
        assert_eq!(config["config"]["User"], "65532");
        assert_eq!(config["config"]["Entrypoint"], json!(["/ktb-agent"]));

        let files = entries(layer);
        let binary = std::fs::read(&binary).unwrap();
        assert_eq!(
            files,
            BTreeMap::from([("ktb-agent".to_owned(), (0o755, binary))])
        );
    }

    #[test]
    fn the_same_executables_give_the_same_archive() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            ("probe", executable(dir.path(), "probe", EM_X86_64)),
            ("echo", executable(dir.path(), "echo", EM_X86_64)),
        ];
        let image = Image {
            reference: "ktb.test/echo:dev",
            files,
            entrypoint: &["/echo"],
            user: 0,
        };
        let (first, second) = (dir.path().join("1.tar"), dir.path().join("2.tar"));
        let written = write_archive(&image, &first).unwrap();
        assert_eq!(written.architecture, Architecture::Amd64);
        write_archive(&image, &second).unwrap();
        assert_eq!(
            std::fs::read(first).unwrap(),
            std::fs::read(second).unwrap()
        );
    }

    #[test]
    fn executables_of_two_architectures_make_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = Image {
            reference: "ktb.test/mixed:dev",
            files: vec![
                ("a", executable(dir.path(), "a", EM_X86_64)),
                ("b", executable(dir.path(), "b", EM_AARCH64)),
            ],
            entrypoint: &["/a"],
            user: 0,
        };
        let out = dir.path().join("mixed.tar");
        let error = write_archive(&image, &out).unwrap_err().to_string();
        assert!(
            error.contains("amd64") && error.contains("arm64"),
            "{error}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn a_reference_without_a_tag_is_latest_and_one_with_a_digest_is_refused() {
        assert_eq!(tag_of("ktb.test/pause:dev").unwrap(), "dev");
        assert_eq!(tag_of("registry:5000/ktb-agent").unwrap(), "latest");
        assert_eq!(tag_of("ktb-agent").unwrap(), "latest");
        for bad in ["", "ktb-agent@sha256:00", "ktb agent"] {
            let error = tag_of(bad).unwrap_err().to_string();
            assert!(error.contains("cannot name the image"), "{error}");
        }
    }
}
