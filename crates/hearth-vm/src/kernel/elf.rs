//! Just enough ELF64 (little-endian) reading for the guest kernel: find a section by name (`.modinfo`
//! of a kernel module) and iterate notes (the PVH entry note of a vmlinux). Reads byte slices only.

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const PT_NOTE: u32 = 4;
/// Xen's note type for the 32-bit PVH entry point, which QEMU and Firecracker use to boot a vmlinux.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a byte slice is not an ELF file we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file (bad magic)")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64Le,
    #[error("truncated or corrupt ELF: {0}")]
    Corrupt(&'static str),
}

/// True when `bytes` starts like an ELF file.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(ELF_MAGIC)
}

/// A validated view of an ELF64 LE file.
pub struct Elf<'a> {
    bytes: &'a [u8],
}

impl<'a> Elf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        if !is_elf(bytes) {
            return Err(ElfError::NotElf);
        }
        if bytes.len() < 64 || bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB {
            return Err(ElfError::NotElf64Le);
        }
        Ok(Elf { bytes })
    }

    /// Contents of the first section called `name`, if any.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let shoff = self.u64_at(0x28)? as usize;
        let shentsize = self.u16_at(0x3a)? as usize;
        let shnum = self.u16_at(0x3c)? as usize;
        let shstrndx = self.u16_at(0x3e)? as usize;
        if shnum == 0 {
            return Ok(None);
        }
        let header = |i: usize| -> Result<(u32, &'a [u8]), ElfError> {
            let base = shoff + i * shentsize;
            let name_off = self.u32_at(base)?;
            let offset = self.u64_at(base + 24)? as usize;
            let size = self.u64_at(base + 32)? as usize;
            let data = self
                .slice(offset, size)
                .ok_or(ElfError::Corrupt("section outside file"))?;
            Ok((name_off, data))
        };
        let (_, names) = header(shstrndx)?;
        for i in 0..shnum {
            let (name_off, data) = header(i)?;
            let section_name = names
                .get(name_off as usize..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .ok_or(ElfError::Corrupt("section name outside string table"))?;
            if section_name == name.as_bytes() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// True when a PT_NOTE segment carries Xen's PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`).
    pub fn has_pvh_entry(&self) -> Result<bool, ElfError> {
        let phoff = self.u64_at(0x20)? as usize;
        let phentsize = self.u16_at(0x36)? as usize;
        let phnum = self.u16_at(0x38)? as usize;
        for i in 0..phnum {
            let base = phoff + i * phentsize;
            if self.u32_at(base)? != PT_NOTE {
                continue;
            }
            let offset = self.u64_at(base + 8)? as usize;
            let size = self.u64_at(base + 32)? as usize;
            let notes = self
                .slice(offset, size)
                .ok_or(ElfError::Corrupt("note outside file"))?;
            if notes_contain(notes, b"Xen", XEN_ELFNOTE_PHYS32_ENTRY) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn slice(&self, offset: usize, len: usize) -> Option<&'a [u8]> {
        self.bytes.get(offset..offset.checked_add(len)?)
    }

    fn u16_at(&self, at: usize) -> Result<u16, ElfError> {
        let b = self
            .slice(at, 2)
            .ok_or(ElfError::Corrupt("header outside file"))?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32_at(&self, at: usize) -> Result<u32, ElfError> {
        let b = self
            .slice(at, 4)
            .ok_or(ElfError::Corrupt("header outside file"))?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64_at(&self, at: usize) -> Result<u64, ElfError> {
        let b = self
            .slice(at, 8)
            .ok_or(ElfError::Corrupt("header outside file"))?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

fn notes_contain(mut notes: &[u8], want_name: &[u8], want_type: u32) -> bool {
    let align4 = |n: usize| (n + 3) & !3;
    while notes.len() >= 12 {
        let word =
            |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().expect("4 bytes")) as usize;
        let (namesz, descsz, kind) = (word(0), word(4), word(8) as u32);
        let name_end = 12 + namesz;
        let Some(name) = notes.get(12..name_end) else {
            return false;
        };
        if name.strip_suffix(b"\0").unwrap_or(name) == want_name && kind == want_type {
            return true;
        }
        let next = 12 + align4(namesz) + align4(descsz);
        let Some(rest) = notes.get(next..) else {
            return false;
        };
        notes = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf_input() {
        assert_eq!(Elf::parse(b"MZ not an elf").err(), Some(ElfError::NotElf));
        assert_eq!(
            Elf::parse(b"\x7fELF\x01\x01").err(),
            Some(ElfError::NotElf64Le)
        );
    }

    #[test]
    fn finds_a_note_among_others() {
        let mut notes = Vec::new();
        for (name, kind) in [(&b"GNU\0"[..], 3u32), (&b"Xen\0"[..], 18)] {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&4u32.to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.extend_from_slice(&[0xaa; 4]);
        }
        assert!(notes_contain(&notes, b"Xen", 18));
        assert!(!notes_contain(&notes, b"Xen", 17));
        assert!(!notes_contain(&notes[..20], b"Xen", 18));
    }
}
