//! What a layer entry may name: normalises tar entry names into a relative path below the staging root
//! and refuses absolute names, `..`, NUL bytes and over-long paths; counts bytes and entries against the
//! configured limits so decompression bombs stop early. Pure logic; touches nothing.

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::LayerError;

/// Bounds on what one image may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total uncompressed tar bytes over all layers.
    pub max_total_bytes: u64,
    /// Total tar entries over all layers.
    pub max_entries: u64,
    /// Longest entry name (bytes, after normalisation).
    pub max_path_len: usize,
    /// Largest GNU long-name/long-link or PAX extension header, checked before it is read.
    pub max_extension_header: u64,
    /// Memory for per-path bookkeeping (names remembered for whiteouts and directory times), counted
    /// as name bytes plus a fixed per-entry overhead, over all layers.
    pub max_bookkeeping_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 16 << 30,
            max_entries: 2_000_000,
            max_path_len: 4096,
            max_extension_header: 1 << 20,
            max_bookkeeping_bytes: 256 << 20,
        }
    }
}

const NAME_MAX: usize = 255;

/// A normalised entry name: components with no `.`, `..` or empty parts, relative to the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryPath {
    path: PathBuf,
}

impl EntryPath {
    /// Normalises `raw` (as found in the tar header or PAX record). An empty result means the root.
    pub fn parse(raw: &[u8], limits: &Limits) -> Result<EntryPath, LayerError> {
        let shown = || String::from_utf8_lossy(raw).into_owned();
        if raw.first() == Some(&b'/') {
            return Err(LayerError::AbsoluteName { entry: shown() });
        }
        if raw.contains(&0) {
            return Err(LayerError::BadName {
                entry: shown(),
                reason: "it contains a NUL byte".into(),
            });
        }
        let mut path = PathBuf::new();
        for component in raw.split(|b| *b == b'/') {
            match component {
                b"" | b"." => continue,
                b".." => return Err(LayerError::Traversal { entry: shown() }),
                c if c.len() > NAME_MAX => {
                    return Err(LayerError::BadName {
                        entry: shown(),
                        reason: format!("a component is longer than {NAME_MAX} bytes"),
                    })
                }
                c => path.push(OsStr::from_bytes(c)),
            }
        }
        if path.as_os_str().len() > limits.max_path_len {
            return Err(LayerError::LimitExceeded {
                what: format!(
                    "entry name length {} > {}",
                    path.as_os_str().len(),
                    limits.max_path_len
                ),
            });
        }
        Ok(EntryPath { path })
    }

    pub fn as_path(&self) -> &Path {
        &self.path
    }

    /// The directory holding this entry (empty = root) and the entry's own name. `None` for the root.
    pub fn split(&self) -> Option<(&Path, &OsStr)> {
        Some((self.path.parent()?, self.path.file_name()?))
    }
}

impl std::fmt::Display for EntryPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.path.display())
    }
}

/// A C string for a single name component (the normaliser already refused NUL bytes).
pub fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// Bookkeeping cost charged per remembered path on top of its name bytes (the `PathBuf`, its
/// allocation header and the set or map slot holding it).
pub const BOOKKEEPING_OVERHEAD: u64 = 64;

/// Counts bytes read through it and fails once `limit` is passed, so a small compressed layer cannot
/// expand without bound.
pub struct LimitedReader<R> {
    inner: R,
    pub(crate) read: u64,
    limit: u64,
}

impl<R: Read> LimitedReader<R> {
    pub fn new(inner: R, already_read: u64, limit: u64) -> Self {
        LimitedReader {
            inner,
            read: already_read,
            limit,
        }
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(BombError(self.limit)));
        }
        Ok(n)
    }
}

/// Marks the I/O error raised by `LimitedReader` so the applier can report it as a limit.
#[derive(Debug)]
pub struct BombError(pub u64);

impl std::fmt::Display for BombError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uncompressed layer content exceeds the limit of {} bytes",
            self.0
        )
    }
}

impl std::error::Error for BombError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EntryPath, LayerError> {
        EntryPath::parse(s.as_bytes(), &Limits::default())
    }

    #[test]
    fn normalises_dot_prefixes_and_slashes() {
        assert_eq!(
            parse("./usr//bin/./sh").unwrap().as_path(),
            Path::new("usr/bin/sh")
        );
        assert!(parse("./").unwrap().split().is_none());
        assert_eq!(
            parse("etc/").unwrap().split().unwrap(),
            (Path::new(""), OsStr::new("etc"))
        );
    }

    #[test]
    fn refuses_traversal_absolute_and_nul() {
        assert!(matches!(
            parse("a/../../etc/passwd"),
            Err(LayerError::Traversal { .. })
        ));
        assert!(matches!(parse(".."), Err(LayerError::Traversal { .. })));
        assert!(matches!(
            parse("/etc/passwd"),
            Err(LayerError::AbsoluteName { .. })
        ));
        assert!(matches!(
            EntryPath::parse(b"a\0b", &Limits::default()),
            Err(LayerError::BadName { .. })
        ));
        let err = parse("x/../y").unwrap_err().to_string();
        assert!(err.contains("x/../y"), "{err}");
    }

    #[test]
    fn bounds_path_length() {
        let limits = Limits {
            max_path_len: 10,
            ..Limits::default()
        };
        assert!(EntryPath::parse(b"abcde/fghij", &limits).is_err());
        assert!(EntryPath::parse(&[b'a'; 256], &Limits::default()).is_err());
    }

    #[test]
    fn limited_reader_stops_at_the_limit() {
        let data = [0u8; 100];
        let mut r = LimitedReader::new(&data[..], 0, 50);
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert!(err.get_ref().unwrap().is::<BombError>());
    }
}
