//! `ktb agent image export`: the agent image as an OCI archive, for
//! clusters that cannot pull it from ghcr.io (a private registry, no way
//! out to the Internet). A cluster admin loads the archive into a registry
//! the nodes can reach and points `--agent-image` (config key
//! `agent-image`) there.
//!
//! No Docker is needed: [`ktb_image`] writes the archive, the same writer
//! and image layout as the project's test cluster, from the `ktb-agent`
//! executable that release archives ship beside `ktb`. The image's
//! architecture is that executable's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use ktb_image::Written;

/// What `export` writes, and from what.
pub struct ExportOptions {
    /// The static Linux `ktb-agent` executable to put in the image; `None`
    /// for the one beside the running `ktb`, where release archives put it.
    pub binary: Option<PathBuf>,
    /// The image's name in the archive, e.g.
    /// [`DEFAULT_AGENT_IMAGE`](crate::session::agent_pod::DEFAULT_AGENT_IMAGE)
    /// or `registry.example.com/ktb-agent:0.1.0`.
    pub reference: String,
    /// The archive to write (replaced if it exists).
    pub output: PathBuf,
}

/// Write the agent image archive `options` describe.
pub fn export(options: &ExportOptions) -> Result<Written> {
    let binary = match &options.binary {
        Some(binary) => {
            ensure_file(binary, "no agent binary at")?;
            binary.clone()
        }
        None => beside_ktb()?,
    };
    let image = ktb_image::agent(&options.reference, binary);
    ktb_image::write_archive(&image, &options.output).with_context(|| {
        format!(
            "writing the agent image archive {}",
            options.output.display()
        )
    })
}

/// `ktb-agent` in the directory of the running `ktb` (its real path, so a
/// symlink on PATH still finds the archive's contents).
fn beside_ktb() -> Result<PathBuf> {
    let ktb = std::env::current_exe().context(
        "cannot tell where this ktb is, to find ktb-agent beside it: \
         give the agent binary with --agent-binary PATH",
    )?;
    let binary = ktb.with_file_name("ktb-agent");
    ensure_file(&binary, "no ktb-agent beside this ktb, at")?;
    Ok(binary)
}

/// An error naming `--agent-binary` unless `path` is a file.
fn ensure_file(path: &Path, missing: &str) -> Result<()> {
    if !path.is_file() {
        bail!(
            "{missing} {}: give the agent binary with --agent-binary PATH, \
             the ktb-agent of the Linux release archive for the nodes' \
             architecture (x86_64 or aarch64)",
            path.display()
        );
    }
    Ok(())
}
