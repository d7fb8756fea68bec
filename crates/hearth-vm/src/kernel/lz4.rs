//! vmlinux extraction from an LZ4-compressed bzImage (how Debian builds its cloud kernel).
//!
//! The bzImage's setup header names the compressed payload (`payload_offset`, `payload_length`); for
//! LZ4 the payload is the *legacy* LZ4 format: magic `02 21 4C 18`, then blocks of
//! `[u32 LE compressed size][LZ4 block]`, each decompressing to at most 8 MiB, and finally the kernel
//! build's 4-byte size trailer (the decompressed length). Pure functions over byte slices.

const LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Legacy LZ4 blocks decompress to at most 8 MiB.
const BLOCK_MAX: usize = 8 << 20;
/// `LZ4_compressBound(8 MiB)`: no valid block is larger, so a bigger "size" is the trailer.
const BLOCK_BOUND: usize = BLOCK_MAX + BLOCK_MAX / 255 + 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lz4Error {
    #[error(
        "no legacy-LZ4 payload found (magic 02 21 4C 18): the kernel is not LZ4-compressed; \
             pass an ELF vmlinux instead"
    )]
    NoPayload,
    #[error("block at byte {offset} does not decompress: {detail}")]
    BadBlock { offset: usize, detail: String },
    #[error("LZ4 stream ended without its size trailer at byte {0}: the bzImage is truncated")]
    Truncated(usize),
    #[error("decompressed {got} bytes but the trailer says {expected}")]
    SizeMismatch { got: usize, expected: usize },
}

/// A located legacy-LZ4 payload.
#[derive(Debug)]
pub struct Payload<'a> {
    /// From the magic to the end of the last block when the header told us the end; else to the end
    /// of the file (the trailer and whatever follows are then found while decoding).
    pub stream: &'a [u8],
    /// The decompressed size from the build's trailer, when the header located it exactly.
    pub expected_len: Option<usize>,
}

/// Locates the compressed payload of a bzImage: from its setup header when present (boot protocol
/// 2.08+), else by scanning for the legacy magic.
pub fn find_payload(bzimage: &[u8]) -> Result<Payload<'_>, Lz4Error> {
    if let Some(payload) = payload_from_header(bzimage) {
        if !payload.starts_with(&LEGACY_MAGIC) || payload.len() < 8 {
            return Err(Lz4Error::NoPayload);
        }
        let (stream, trailer) = payload.split_at(payload.len() - 4);
        let expected = u32::from_le_bytes(trailer.try_into().expect("4 bytes")) as usize;
        return Ok(Payload {
            stream,
            expected_len: Some(expected),
        });
    }
    let start = bzimage
        .windows(4)
        .position(|w| w == LEGACY_MAGIC)
        .ok_or(Lz4Error::NoPayload)?;
    Ok(Payload {
        stream: &bzimage[start..],
        expected_len: None,
    })
}

/// Decompresses the payload and checks the decompressed size against the trailer.
pub fn decompress_payload(payload: &Payload<'_>) -> Result<Vec<u8>, Lz4Error> {
    let out = decompress_legacy(payload.stream)?;
    match payload.expected_len {
        Some(expected) if expected != out.len() => Err(Lz4Error::SizeMismatch {
            got: out.len(),
            expected,
        }),
        _ => Ok(out),
    }
}

fn payload_from_header(bzimage: &[u8]) -> Option<&[u8]> {
    if bzimage.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let u32_at = |at: usize| {
        Some(u32::from_le_bytes(
            bzimage.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let setup_sects = match *bzimage.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    bzimage.get(start..start.checked_add(len)?)
}

/// Decompresses a legacy-LZ4 stream (starting at its magic). A stream may end after its last block,
/// or continue with the size trailer (a word equal to the bytes decoded so far, or too large to be a
/// block size) and unrelated bytes, which are not read.
pub fn decompress_legacy(stream: &[u8]) -> Result<Vec<u8>, Lz4Error> {
    if !stream.starts_with(&LEGACY_MAGIC) {
        return Err(Lz4Error::NoPayload);
    }
    let mut out = Vec::with_capacity(stream.len() * 4);
    let mut block = vec![0u8; BLOCK_MAX];
    let mut pos = 4;
    while pos + 4 <= stream.len() {
        let word = u32::from_le_bytes(stream[pos..pos + 4].try_into().expect("4 bytes"));
        let size = word as usize;
        if word.to_le_bytes() == LEGACY_MAGIC {
            // Concatenated legacy frames: a new magic starts the next one.
            pos += 4;
            continue;
        }
        if size == out.len() && !out.is_empty() {
            return Ok(out);
        }
        if size > BLOCK_BOUND || pos + 4 + size > stream.len() {
            return Err(if out.is_empty() {
                Lz4Error::BadBlock {
                    offset: pos,
                    detail: format!("implausible block size {size}"),
                }
            } else {
                Lz4Error::SizeMismatch {
                    got: out.len(),
                    expected: size,
                }
            });
        }
        let data = &stream[pos + 4..pos + 4 + size];
        let n =
            lz4_flex::block::decompress_into(data, &mut block).map_err(|e| Lz4Error::BadBlock {
                offset: pos,
                detail: e.to_string(),
            })?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    if pos != stream.len() {
        return Err(Lz4Error::Truncated(pos));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_stream(chunks: &[&[u8]], trailer: bool) -> Vec<u8> {
        let mut stream = LEGACY_MAGIC.to_vec();
        let mut total = 0;
        for chunk in chunks {
            let block = lz4_flex::block::compress(chunk);
            stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
            stream.extend_from_slice(&block);
            total += chunk.len();
        }
        if trailer {
            stream.extend_from_slice(&(total as u32).to_le_bytes());
        }
        stream
    }

    #[test]
    fn decodes_blocks_and_stops_at_the_trailer() {
        let a = vec![7u8; 100_000];
        let b: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let stream = legacy_stream(&[&a, &b], true);
        let out = decompress_legacy(&stream).unwrap();
        assert_eq!(out.len(), a.len() + b.len());
        assert_eq!(&out[..a.len()], &a[..]);
        assert_eq!(&out[a.len()..], &b[..]);
        // Junk after the trailer (the rest of the bzImage) is not read.
        let mut with_junk = stream.clone();
        with_junk.extend_from_slice(&[0xff; 64]);
        assert_eq!(decompress_legacy(&with_junk).unwrap().len(), out.len());
    }

    #[test]
    fn a_wrong_trailer_is_an_error() {
        let mut stream = legacy_stream(&[&[1u8; 1000]], false);
        stream.extend_from_slice(&999_999_999u32.to_le_bytes());
        assert!(matches!(
            decompress_legacy(&stream),
            Err(Lz4Error::SizeMismatch { .. })
        ));
        assert_eq!(
            decompress_legacy(b"\x1f\x8b gzip"),
            Err(Lz4Error::NoPayload)
        );
    }

    #[test]
    fn a_corrupt_block_is_an_error() {
        let mut stream = legacy_stream(&[&[3u8; 5000]], true);
        let len = stream.len();
        stream[8..len - 4].fill(0xff);
        assert!(matches!(
            decompress_legacy(&stream),
            Err(Lz4Error::BadBlock { .. })
        ));
    }
}
