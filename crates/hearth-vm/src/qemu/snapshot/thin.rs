//! Thin saved states: a saved VM's migration stream with the pages it shares with its boot
//! template taken out. A VM restored from a template maps the template's memory copy-on-write, but
//! QEMU saves its RAM whole, so every resume (and every fork's child) used to load the template's
//! pages again, as private copies: a woken idle sandbox cost 106 MiB of host memory against 47 MiB
//! before it slept, and its resume read ~100 MiB it did not need. [`thin`] rewrites the stream
//! QEMU wrote without the guest-RAM pages equal to the template's page at the same offset (and the
//! zero-page records where the template page is zero too); the VM then starts again on a private
//! mapping of the same template memory (`GuestMemory::FromTemplate`), whose pages are exactly the
//! ones left out, and loads only what the guest changed.
//!
//! The format is QEMU's (7.2, `migration/savevm.c` and `ram.c`): a header, the configuration
//! section, the iterable `ram` section's START/PART/END parts (page records: a big-endian u64 of
//! page offset and flags, the block's name unless `CONTINUE`, then one fill byte for a zero page or
//! 4096 bytes for a page), each with its footer, then the device sections, which are copied as
//! they are. Anything else in the RAM part (compression, XBZRLE, an iterable section other than
//! `ram`) is refused with [`ThinError::Unsupported`], and the caller keeps the full state: thinning
//! is an optimisation, never a condition. A page sent twice is kept from its second sending on (the
//! later copy wins when QEMU loads it), and records after a dropped one name their block again
//! where QEMU's relied on the dropped one's.
//!
//! The stream comes from a VMM that runs guest code, so it is hostile input: every length is
//! bounded by the input, offsets are checked against the template, and nothing is allocated by a
//! size the stream states beyond a 255-byte name. Pure: a reader, a writer and the template's bytes.

use std::io::{self, BufRead, Write};
use std::ops::Range;

/// QEMU's stream magic ("QEVM") and the only version it writes.
const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

/// Section kinds (`migration/savevm.c`).
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const SECTION_FOOTER: u8 = 0x7e;

/// RAM record flags (`migration/ram.c`), in the low bits of the page offset.
const ZERO: u64 = 0x02;
const MEM_SIZE: u64 = 0x04;
const PAGE: u64 = 0x08;
const EOS: u64 = 0x10;
const CONTINUE: u64 = 0x20;
/// x86's target page.
pub(crate) const PAGE_SIZE: usize = 4096;
const FLAG_BITS: u64 = PAGE_SIZE as u64 - 1;

/// The template memory a state is thinned against: its bytes, and where its file holds data (a
/// page outside every range is a hole, zero, and is never read: reading it would fill the page
/// cache with zeroes for nothing).
pub(crate) struct Base<'a> {
    pub bytes: &'a [u8],
    /// Sorted, disjoint byte ranges.
    pub data: &'a [Range<u64>],
}

impl Base<'_> {
    /// Whether the page at `offset` (checked to be inside) equals `page`.
    fn page_is(&self, offset: u64, page: &[u8]) -> bool {
        let end = offset + PAGE_SIZE as u64;
        let first = self.data.partition_point(|r| r.end <= offset);
        let in_hole = self.data.get(first).is_none_or(|r| r.start >= end);
        if in_hole {
            page == ZERO_PAGE
        } else {
            let at = offset as usize;
            &self.bytes[at..at + PAGE_SIZE] == page
        }
    }
}

const ZERO_PAGE: &[u8; PAGE_SIZE] = &[0; PAGE_SIZE];

/// What thinning did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Thinned {
    /// Pages (with data) of the template's block left in / taken out.
    pub kept_pages: u64,
    pub dropped_pages: u64,
    /// Zero-page records taken out (the template's page is zero too).
    pub dropped_zero: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ThinError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The stream is not one this module understands: the caller keeps it whole.
    #[error("the saved state cannot be thinned: {0}")]
    Unsupported(String),
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, ThinError> {
    Err(ThinError::Unsupported(why.into()))
}

/// Copies the saved state `input` to `output` without the pages of RAM block `block` equal to
/// `base` (the template memory the VM maps) at the same offset. `ignore_shared`: the state was
/// saved with QEMU's `x-ignore-shared` (its RAM setup then carries each block's address).
pub(crate) fn thin(
    input: impl BufRead,
    output: impl Write,
    base: &Base<'_>,
    block: &str,
    ignore_shared: bool,
) -> Result<Thinned, ThinError> {
    let mut stream = Stream {
        input,
        output,
        base,
        block,
        ignore_shared,
        seen: vec![0u64; base.bytes.len().div_ceil(PAGE_SIZE).div_ceil(64)],
        last_in: None,
        last_out: None,
        ram_sections: Vec::new(),
        done: Thinned::default(),
    };
    stream.run()?;
    stream.output.flush()?;
    Ok(stream.done)
}

struct Stream<'a, R, W> {
    input: R,
    output: W,
    base: &'a Base<'a>,
    block: &'a str,
    ignore_shared: bool,
    /// Pages of `block` already met, one bit each.
    seen: Vec<u64>,
    /// The block the input's last record named, and the output's (what `CONTINUE` refers to).
    last_in: Option<Vec<u8>>,
    last_out: Option<Vec<u8>>,
    /// The section ids of `ram`.
    ram_sections: Vec<u32>,
    done: Thinned,
}

impl<R: BufRead, W: Write> Stream<'_, R, W> {
    fn run(&mut self) -> Result<(), ThinError> {
        if self.be32()? != MAGIC {
            return unsupported("not a QEMU saved state");
        }
        if self.be32()? != VERSION {
            return unsupported("an unknown stream version");
        }
        self.put(&MAGIC.to_be_bytes())?;
        self.put(&VERSION.to_be_bytes())?;
        loop {
            let Some(kind) = self.peek()? else {
                return unsupported("the stream ended inside its RAM");
            };
            match kind {
                CONFIGURATION => {
                    self.copy(1)?;
                    let len = self.be32()?;
                    if len > 255 {
                        return unsupported("a machine name over 255 bytes");
                    }
                    self.put(&len.to_be_bytes())?;
                    self.copy(len as usize)?;
                    self.configuration_subsections()?;
                }
                SECTION_START => {
                    self.copy(1)?;
                    let id = self.copy_be32()?;
                    let name = self.name()?;
                    self.put_name(&name)?;
                    self.copy(8)?; // instance and version ids
                    if name != b"ram" {
                        return unsupported(format!(
                            "an iterable section {:?}",
                            String::from_utf8_lossy(&name)
                        ));
                    }
                    self.ram_sections.push(id);
                    self.ram_records()?;
                    self.footer()?;
                }
                SECTION_PART | SECTION_END => {
                    self.copy(1)?;
                    let id = self.copy_be32()?;
                    if !self.ram_sections.contains(&id) {
                        return unsupported(format!("a part of unknown section {id}"));
                    }
                    self.ram_records()?;
                    self.footer()?;
                }
                // Device state (no more RAM), the end, and the description: copied as they are.
                _ => {
                    let copied = io::copy(&mut self.input, &mut self.output)?;
                    self.done.bytes_in += copied;
                    self.done.bytes_out += copied;
                    return Ok(());
                }
            }
        }
    }

    /// The configuration's subsections QEMU 7.2 may write.
    fn configuration_subsections(&mut self) -> Result<(), ThinError> {
        while self.peek()? == Some(SUBSECTION) {
            self.copy(1)?;
            let name = self.name()?;
            self.put_name(&name)?;
            self.copy(4)?; // version
            match &name[..] {
                b"configuration/target-page-bits" => self.copy(4)?,
                b"configuration/uuid" => self.copy(16)?,
                b"configuration/capabilities" => {
                    for _ in 0..self.copy_be32()? {
                        let capability = self.name()?;
                        self.put_name(&capability)?;
                    }
                }
                other => {
                    return unsupported(format!(
                        "a configuration subsection {:?}",
                        String::from_utf8_lossy(other)
                    ))
                }
            }
        }
        Ok(())
    }

    /// One part of the `ram` section: records up to and including `EOS`.
    fn ram_records(&mut self) -> Result<(), ThinError> {
        loop {
            let header = self.be64()?;
            let flags = header & FLAG_BITS;
            let offset = header & !FLAG_BITS;
            if flags & MEM_SIZE != 0 {
                self.put(&header.to_be_bytes())?;
                self.ram_setup(offset)?;
                continue;
            }
            if flags & EOS != 0 {
                if flags != EOS {
                    return unsupported(format!("RAM flags {flags:#x}"));
                }
                return self.put(&header.to_be_bytes());
            }
            let name = if flags & CONTINUE != 0 {
                match &self.last_in {
                    Some(name) => name.clone(),
                    None => return unsupported("a page record continues no block"),
                }
            } else {
                let name = self.name()?;
                self.last_in = Some(name.clone());
                name
            };
            let kind = flags & !CONTINUE;
            let ours = name == self.block.as_bytes();
            match kind {
                ZERO => {
                    let fill = self.u8()?;
                    let drop = ours
                        && fill == 0
                        && self.first_seen(offset)?
                        && self.base.page_is(offset, ZERO_PAGE);
                    if drop {
                        self.done.dropped_zero += 1;
                    } else {
                        self.record(offset, ZERO, &name)?;
                        self.put(&[fill])?;
                    }
                }
                PAGE => {
                    let mut page = [0u8; PAGE_SIZE];
                    self.read(&mut page)?;
                    let drop = ours && self.first_seen(offset)? && self.base.page_is(offset, &page);
                    if drop {
                        self.done.dropped_pages += 1;
                    } else {
                        if ours {
                            self.done.kept_pages += 1;
                        }
                        self.record(offset, PAGE, &name)?;
                        self.put(&page)?;
                    }
                }
                _ => return unsupported(format!("RAM flags {flags:#x}")),
            }
        }
    }

    /// The block list after a `MEM_SIZE` header: names and lengths adding up to `total`.
    fn ram_setup(&mut self, total: u64) -> Result<(), ThinError> {
        let mut left = total;
        while left > 0 {
            let name = self.name()?;
            self.put_name(&name)?;
            let length = self.copy_be64()?;
            if length == 0 || length > left {
                return unsupported("RAM block lengths that do not add up");
            }
            if name == self.block.as_bytes() && length != self.base.bytes.len() as u64 {
                return unsupported(format!(
                    "RAM block {} is {length} bytes, its template {}",
                    self.block,
                    self.base.bytes.len()
                ));
            }
            if self.ignore_shared {
                self.copy(8)?; // the block's guest address
            }
            left -= length;
        }
        Ok(())
    }

    /// Whether the page at `offset` of the template's block is met for the first time (a page
    /// sent again is always kept: its later copy is the one QEMU ends with).
    fn first_seen(&mut self, offset: u64) -> Result<bool, ThinError> {
        let end = offset.checked_add(PAGE_SIZE as u64);
        if end.is_none_or(|end| end > self.base.bytes.len() as u64) {
            return unsupported(format!("a page at {offset:#x}, past the template"));
        }
        let page = (offset / PAGE_SIZE as u64) as usize;
        let (word, bit) = (page / 64, 1u64 << (page % 64));
        let first = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        Ok(first)
    }

    /// A record header, naming its block unless the output's last record did.
    fn record(&mut self, offset: u64, kind: u64, name: &[u8]) -> Result<(), ThinError> {
        if self.last_out.as_deref() == Some(name) {
            self.put(&(offset | kind | CONTINUE).to_be_bytes())
        } else {
            self.put(&(offset | kind).to_be_bytes())?;
            self.put_name(name)?;
            self.last_out = Some(name.to_vec());
            Ok(())
        }
    }

    fn footer(&mut self) -> Result<(), ThinError> {
        if self.peek()? == Some(SECTION_FOOTER) {
            self.copy(5)?;
        }
        Ok(())
    }

    fn peek(&mut self) -> Result<Option<u8>, ThinError> {
        Ok(self.input.fill_buf()?.first().copied())
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), ThinError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ThinError::Unsupported("the stream ends early".into()),
            _ => e.into(),
        })?;
        self.done.bytes_in += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, ThinError> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn be32(&mut self) -> Result<u32, ThinError> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn be64(&mut self) -> Result<u64, ThinError> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A length byte and that many bytes.
    fn name(&mut self) -> Result<Vec<u8>, ThinError> {
        let mut name = vec![0u8; usize::from(self.u8()?)];
        self.read(&mut name)?;
        Ok(name)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ThinError> {
        self.output.write_all(bytes)?;
        self.done.bytes_out += bytes.len() as u64;
        Ok(())
    }

    fn put_name(&mut self, name: &[u8]) -> Result<(), ThinError> {
        self.put(&[name.len() as u8])?;
        self.put(name)
    }

    /// Copies `n` bytes through.
    fn copy(&mut self, n: usize) -> Result<(), ThinError> {
        let mut buf = [0u8; 16];
        let mut left = n;
        while left > 0 {
            let take = left.min(buf.len());
            self.read(&mut buf[..take])?;
            self.put(&buf[..take])?;
            left -= take;
        }
        Ok(())
    }

    fn copy_be32(&mut self) -> Result<u32, ThinError> {
        let v = self.be32()?;
        self.put(&v.to_be_bytes())?;
        Ok(v)
    }

    fn copy_be64(&mut self) -> Result<u64, ThinError> {
        let v = self.be64()?;
        self.put(&v.to_be_bytes())?;
        Ok(v)
    }
}

#[cfg(test)]
#[path = "thin_tests.rs"]
mod tests;
