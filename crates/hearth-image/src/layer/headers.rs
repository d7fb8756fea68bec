//! Inspects every 512-byte tar header of a layer stream before the `tar` crate sees it, because the
//! crate reads GNU long-name/long-link and PAX extension data into memory whole and expands the holes of
//! GNU sparse members without counting them. `HeaderGuard` follows the archive's framing exactly as
//! `tar` 0.4 does (header, data rounded up to 512 bytes, a PAX `size` record overriding the next
//! member's size, end at the first zero block) and fails the read, naming the member, when an
//! extension header declares more than the cap or a member is GNU sparse. Pure logic over a reader;
//! touches nothing.

use std::io::{self, Read};

use tar::{EntryType, Header, PaxExtensions};

const BLOCK: u64 = 512;

/// Why the guard stopped the stream; `apply::tar_error` turns it into a `LayerError`.
#[derive(Debug)]
pub enum HeaderRefused {
    /// An extension header (long name, long link, PAX) larger than the cap.
    TooLarge {
        entry: String,
        kind: &'static str,
        size: u64,
        cap: u64,
        offset: u64,
    },
    /// A GNU sparse member: its holes would be written as real bytes the stream never carried.
    Sparse { entry: String, real_size: String },
}

impl std::fmt::Display for HeaderRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderRefused::TooLarge {
                entry,
                kind,
                size,
                cap,
                offset,
            } => write!(
                f,
                "{kind} header {entry:?} at byte {offset} of the layer declares {size} bytes, more than the cap of {cap} bytes"
            ),
            HeaderRefused::Sparse { entry, real_size } => write!(
                f,
                "layer entry {entry:?} is a GNU sparse file (declared size {real_size}); sparse members are refused because their holes expand without bound and Docker-built images never contain them"
            ),
        }
    }
}

impl std::error::Error for HeaderRefused {}

enum State {
    /// Collecting the next header block.
    Header,
    /// Inside a member's data (padding included); `content` bytes of it are still the member's own.
    Data { remaining: u64, content: u64 },
    /// After the end-of-archive block (or a header the `tar` crate itself will reject).
    Done,
}

/// What the data being read belongs to, when the guard keeps a (bounded) copy of it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    Pax,
    LongName,
}

/// A reader that passes a tar stream through unchanged while checking each header.
pub struct HeaderGuard<R> {
    inner: R,
    cap: u64,
    offset: u64,
    state: State,
    header: [u8; BLOCK as usize],
    filled: usize,
    capture: Capture,
    captured: Vec<u8>,
    /// The `size` record of a PAX header waiting for the member it describes.
    pending_pax_size: Option<u64>,
    /// A GNU long name waiting for its member (for error messages only).
    pending_long_name: Option<Vec<u8>>,
}

impl<R: Read> HeaderGuard<R> {
    /// `cap` bounds the data of each long-name, long-link and PAX header.
    pub fn new(inner: R, cap: u64) -> Self {
        HeaderGuard {
            inner,
            cap,
            offset: 0,
            state: State::Header,
            header: [0; BLOCK as usize],
            filled: 0,
            capture: Capture::None,
            captured: Vec::new(),
            pending_pax_size: None,
            pending_long_name: None,
        }
    }

    fn process(&mut self, mut bytes: &[u8]) -> Result<(), HeaderRefused> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Header => {
                    let take = (BLOCK as usize - self.filled).min(bytes.len());
                    self.header[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
                    self.filled += take;
                    bytes = &bytes[take..];
                    self.offset += take as u64;
                    if self.filled == BLOCK as usize {
                        self.filled = 0;
                        self.on_header()?;
                    }
                }
                State::Data { remaining, content } => {
                    let take = (*remaining).min(bytes.len() as u64) as usize;
                    let own = (*content).min(take as u64) as usize;
                    if self.capture != Capture::None {
                        self.captured.extend_from_slice(&bytes[..own]);
                    }
                    *remaining -= take as u64;
                    *content -= own as u64;
                    bytes = &bytes[take..];
                    self.offset += take as u64;
                    if *remaining == 0 {
                        self.end_of_data();
                    }
                }
            }
        }
        Ok(())
    }

    fn on_header(&mut self) -> Result<(), HeaderRefused> {
        if self.header.iter().all(|b| *b == 0) {
            self.state = State::Done; // the tar crate stops here too (zeros are not ignored)
            return Ok(());
        }
        let header = Header::from_byte_slice(&self.header);
        let sum: u32 = self.header[..148]
            .iter()
            .chain(&self.header[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * 32;
        let (Ok(cksum), Ok(declared)) = (header.cksum(), header.entry_size()) else {
            self.state = State::Done; // the tar crate rejects this header and stops reading
            return Ok(());
        };
        if sum != cksum {
            self.state = State::Done;
            return Ok(());
        }
        let kind = header.entry_type();
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        let header_offset = self.offset - BLOCK;
        if extension && declared > self.cap {
            return Err(HeaderRefused::TooLarge {
                entry: String::from_utf8_lossy(&header.path_bytes()).into_owned(),
                kind: extension_kind(kind),
                size: declared,
                cap: self.cap,
                offset: header_offset,
            });
        }
        if kind == EntryType::GNUSparse {
            let name = self
                .pending_long_name
                .take()
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let real_size = header
                .as_gnu()
                .and_then(|g| g.real_size().ok())
                .map_or_else(|| "unreadable".to_string(), |s| format!("{s} bytes"));
            return Err(HeaderRefused::Sparse {
                entry: String::from_utf8_lossy(trim_nul(&name)).into_owned(),
                real_size,
            });
        }
        // Mirror `tar`'s `next_entry`: recognised long-name/long-link/PAX headers describe the next
        // member; anything else is a member, which consumes the pending PAX size (and only a
        // non-extension member takes it as its own size).
        let mut size = declared;
        self.capture = Capture::None;
        if recognized && (kind.is_gnu_longname() || kind.is_gnu_longlink()) {
            if kind.is_gnu_longname() {
                self.capture = Capture::LongName;
            }
        } else if recognized && kind.is_pax_local_extensions() {
            self.capture = Capture::Pax;
        } else {
            if let Some(pax) = self.pending_pax_size.take().filter(|_| !extension) {
                size = pax;
            }
            self.pending_long_name = None;
        }
        self.captured.clear();
        let Some(padded) = size.checked_add(BLOCK - 1).map(|s| s & !(BLOCK - 1)) else {
            self.state = State::Done; // "size overflow" in the tar crate
            return Ok(());
        };
        self.state = State::Data {
            remaining: padded,
            content: size,
        };
        if padded == 0 {
            self.end_of_data();
        }
        Ok(())
    }

    fn end_of_data(&mut self) {
        match self.capture {
            Capture::Pax => self.pending_pax_size = pax_size(&self.captured),
            Capture::LongName => self.pending_long_name = Some(std::mem::take(&mut self.captured)),
            Capture::None => {}
        }
        self.capture = Capture::None;
        self.captured = Vec::new();
        self.state = State::Header;
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.process(&buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }
}

fn extension_kind(kind: EntryType) -> &'static str {
    if kind.is_gnu_longname() {
        "GNU long-name"
    } else if kind.is_gnu_longlink() {
        "GNU long-link"
    } else if kind.is_pax_global_extensions() {
        "PAX global"
    } else {
        "PAX extended"
    }
}

fn trim_nul(name: &[u8]) -> &[u8] {
    name.strip_suffix(&[0]).unwrap_or(name)
}

/// The `size` record exactly as `tar` 0.4 reads it (`pax_extensions_value`): the first `size` key, and
/// nothing at all if a record before it is malformed or its value is not a number.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gnu(kind: EntryType, name: &str, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_cksum();
        h
    }

    fn pass(data: &[u8], cap: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // Odd read sizes so headers straddle reads.
        let mut guard = HeaderGuard::new(io::BufReader::with_capacity(7, data), cap);
        guard.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_their_data() {
        let mut tar = gnu(EntryType::GNULongName, "././@LongLink", 5 << 20)
            .as_bytes()
            .to_vec();
        tar.resize(tar.len() + 4096, b'a'); // the data need not even be there
        let err = pass(&tar, 1 << 20).unwrap_err();
        let refused = err.get_ref().unwrap().downcast_ref::<HeaderRefused>();
        assert!(
            matches!(refused, Some(HeaderRefused::TooLarge { size, .. }) if *size == 5 << 20),
            "{err}"
        );
    }

    #[test]
    fn follows_pax_size_overrides_to_find_the_next_header() {
        // A PAX record says the file holds 1024 bytes although its header says 0; the member after
        // it is sparse and must still be seen as a header.
        let record = b"13 size=1024\n";
        let mut tar = gnu(EntryType::XHeader, "pax", record.len() as u64)
            .as_bytes()
            .to_vec();
        tar.extend_from_slice(record);
        tar.resize(1024, 0);
        tar.extend_from_slice(gnu(EntryType::Regular, "f", 0).as_bytes());
        tar.resize(tar.len() + 1024, b'x');
        tar.extend_from_slice(gnu(EntryType::GNUSparse, "s", 0).as_bytes());
        tar.resize(tar.len() + 1024, 0);
        let err = pass(&tar, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("sparse"), "{err}");
    }

    #[test]
    fn ordinary_archives_pass_unchanged() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(200) + "file";
        let mut h = Header::new_gnu();
        h.set_size(3);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        assert_eq!(pass(&tar, 1 << 20).unwrap(), tar);
    }
}
