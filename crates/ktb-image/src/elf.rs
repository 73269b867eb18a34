//! Which machine an executable runs on, read from its ELF header: the
//! image's platform is the one its binaries were built for, never a
//! setting that could disagree with them (an arm64 node would pull the
//! image and fail with "exec format error" in the pod's log).

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// The CPU architecture of an image, as OCI platforms spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `amd64`: x86-64 executables (`x86_64-unknown-linux-musl`).
    Amd64,
    /// `arm64`: AArch64 executables (`aarch64-unknown-linux-musl`).
    Arm64,
}

/// ELF `e_machine` values (System V ABI, "Machine Information").
pub(crate) const EM_X86_64: u16 = 62;
pub(crate) const EM_AARCH64: u16 = 183;

impl Architecture {
    /// The OCI name: `amd64` or `arm64`.
    pub fn oci_name(self) -> &'static str {
        match self {
            Architecture::Amd64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }

    /// The architecture of the executable at `path`, or why it cannot run
    /// in a Linux container of either architecture.
    pub fn of_executable(path: &Path) -> Result<Architecture> {
        let mut header = [0u8; 20];
        std::fs::File::open(path)
            .and_then(|mut file| file.read_exact(&mut header))
            .with_context(|| format!("reading the ELF header of {}", path.display()))?;
        Architecture::of_elf_header(&header).with_context(|| {
            format!(
                "{} cannot be the binary of a Linux container image",
                path.display()
            )
        })
    }

    /// The architecture named by the first 20 bytes of an ELF file.
    fn of_elf_header(header: &[u8; 20]) -> Result<Architecture> {
        if header[..4] != *b"\x7fELF" {
            bail!(
                "it is not an ELF executable (a macOS or Windows build?): \
                 use the Linux build, x86_64 or aarch64 like the cluster's nodes"
            );
        }
        // EI_CLASS 2: 64-bit; EI_DATA 1: little-endian, which both
        // supported machines are.
        if header[4] != 2 || header[5] != 1 {
            bail!("it is not a 64-bit little-endian ELF executable");
        }
        match u16::from_le_bytes([header[18], header[19]]) {
            EM_X86_64 => Ok(Architecture::Amd64),
            EM_AARCH64 => Ok(Architecture::Arm64),
            machine => bail!(
                "it is built for ELF machine {machine}, neither x86-64 ({EM_X86_64}) \
                 nor aarch64 ({EM_AARCH64})"
            ),
        }
    }
}

/// The first 20 bytes of a 64-bit little-endian ELF file for `machine`:
/// enough of an executable for the tests of this crate.
#[cfg(test)]
pub(crate) fn elf_header(machine: u16) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2;
    header[5] = 1;
    header[18..20].copy_from_slice(&machine.to_le_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_64_and_aarch64_executables_are_amd64_and_arm64() {
        let of = |machine| Architecture::of_elf_header(&elf_header(machine)).unwrap();
        assert_eq!(of(EM_X86_64), Architecture::Amd64);
        assert_eq!(of(EM_AARCH64), Architecture::Arm64);
    }

    #[test]
    fn other_machines_and_formats_are_refused_with_the_reason() {
        let riscv = Architecture::of_elf_header(&elf_header(243)).unwrap_err();
        assert!(riscv.to_string().contains("ELF machine 243"), "{riscv}");
        let mut mach_o = [0u8; 20];
        mach_o[..4].copy_from_slice(&[0xcf, 0xfa, 0xed, 0xfe]);
        let mach_o = Architecture::of_elf_header(&mach_o).unwrap_err();
        assert!(mach_o.to_string().contains("not an ELF"), "{mach_o}");
    }

    /// A real executable: this test's own binary.
    #[test]
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    fn the_test_binary_is_of_the_machine_it_runs_on() {
        let expected = if cfg!(target_arch = "x86_64") {
            Architecture::Amd64
        } else {
            Architecture::Arm64
        };
        let exe = std::env::current_exe().unwrap();
        assert_eq!(Architecture::of_executable(&exe).unwrap(), expected);
    }
}
