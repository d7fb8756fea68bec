//! The cpio "newc" format (`070701`), the only one the kernel unpacks into an initramfs: a 110-byte
//! ASCII-hex header, the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes, and a
//! final `TRAILER!!!` entry. Writer for hearth's initramfs; a reader for checking what was written.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFLNK: u32 = 0o120000;

/// Streams newc entries into `W`. Names are relative (`init`, `lib/modules/x.ko`); parents must be
/// written before their children, as the kernel creates entries in archive order.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1 }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node, e.g. `dev/console` (5, 1) so that PID 1 starts with a console.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name_len = name.len() + 1;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let (rdev_major, rdev_minor) = rdev;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev_major,
            rdev_minor,
            name_len as u32,
            0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name_len + 3);
        header.extend_from_slice(MAGIC);
        for field in fields {
            write!(header, "{field:08X}")?;
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len() + pad4(HEADER_LEN + name_len), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 3][..pad4(data.len())])
    }
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a whole newc archive up to its trailer.
pub fn read_archive(mut bytes: &[u8]) -> Result<Vec<CpioEntry>, String> {
    let mut entries = Vec::new();
    loop {
        if bytes.len() < HEADER_LEN || &bytes[..6] != MAGIC {
            return Err("missing newc header (archive truncated or not newc)".into());
        }
        let field = |i: usize| -> Result<u32, String> {
            let hex =
                std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            u32::from_str_radix(hex, 16).map_err(|e| format!("bad header field {hex:?}: {e}"))
        };
        let (mode, size, name_len) = (field(1)?, field(6)? as usize, field(11)? as usize);
        let rdev = (field(9)?, field(10)?);
        let name_end = HEADER_LEN + name_len;
        let data_start = name_end + pad4(name_end);
        let data_end = data_start + size;
        if bytes.len() < data_end || name_len == 0 {
            return Err("entry runs past the end of the archive".into());
        }
        let name = String::from_utf8_lossy(&bytes[HEADER_LEN..name_end - 1]).into_owned();
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev,
            data: bytes[data_start..data_end].to_vec(),
        });
        bytes = &bytes[(data_end + pad4(data_end)).min(bytes.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_entry_kind() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("odd", 0o644, b"12345").unwrap();
        w.symlink("sh", "/bin/busybox").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let entries = read_archive(&archive).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "odd", "sh"]);
        assert_eq!(entries[1].mode, S_IFCHR | 0o600);
        assert_eq!(entries[1].rdev, (5, 1));
        assert_eq!(entries[2].mode, S_IFREG | 0o755);
        assert_eq!(entries[3].data, b"12345");
        assert_eq!(entries[4].data, b"/bin/busybox");
    }
}
