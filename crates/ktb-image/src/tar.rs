//! The smallest tar writer an OCI archive needs: ustar regular files and
//! directories, root-owned, mtime 0, so the same content always gives the
//! same bytes (and so the same layer digest). Names fit ustar's 100 bytes
//! by construction (image files sit at the root, blob names are 78 bytes),
//! so a longer one is a bug and panics.

/// An archive being written, in memory: images are a few static binaries.
#[derive(Default)]
pub struct Tar {
    buf: Vec<u8>,
}

impl Tar {
    pub fn dir(&mut self, name: &str, mode: u32) {
        self.entry(&format!("{name}/"), mode, b'5', &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, mode, b'0', data);
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, data: &[u8]) {
        assert!(name.len() < 100, "tar name too long: {name}");
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut header[100..108], mode.into());
        octal(&mut header[108..116], 0); // uid
        octal(&mut header[116..124], 0); // gid
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], 0); // mtime
        header[148..156].fill(b' ');
        header[156] = kind;
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    /// The archive, closed by the two zero blocks tar readers expect.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 1024));
        self.buf
    }
}

/// NUL-terminated, zero-padded octal, as ustar numeric fields are.
fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}
