//! The body frame codec: `[kind u8][len u32 BE][payload]`, payload at most [`MAX_PAYLOAD`] bytes.
//!
//! Exec request and response bodies are sequences of these frames carried in HTTP/2 DATA frames; a
//! body frame may span several DATA frames and one DATA frame may hold several body frames. Pure
//! byte manipulation: no I/O.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest payload a frame may carry (64 KiB). Larger frames are rejected, which bounds the memory a
/// decoder needs for one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes before the payload: kind (1) + big-endian length (4).
pub const HEADER_LEN: usize = 5;

/// What a frame carries. The numeric values are the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Request, first frame: JSON [`crate::ExecRequest`].
    ExecStart = 0x01,
    /// Request: bytes for the command's stdin.
    Stdin = 0x02,
    /// Response, first frame: JSON [`crate::ExecStarted`].
    Started = 0x10,
    /// Response: bytes the command wrote to stdout.
    Stdout = 0x11,
    /// Response: bytes the command wrote to stderr.
    Stderr = 0x12,
    /// Response, last frame: JSON [`crate::ExitStatus`].
    Exit = 0x13,
    /// Response, last frame instead of `Exit`: JSON [`crate::AgentError`] (the agent failed after the
    /// command started; the command has been killed).
    Error = 0x14,
}

impl FrameKind {
    /// The kind for a wire byte, or `None` for a byte this protocol version does not define.
    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            0x01 => FrameKind::ExecStart,
            0x02 => FrameKind::Stdin,
            0x10 => FrameKind::Started,
            0x11 => FrameKind::Stdout,
            0x12 => FrameKind::Stderr,
            0x13 => FrameKind::Exit,
            0x14 => FrameKind::Error,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            payload: payload.into(),
        }
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: serde::Serialize>(kind: FrameKind, value: &T) -> Frame {
        // Serializing our own plain data types cannot fail (no maps with non-string keys).
        let payload = serde_json::to_vec(value).expect("protocol types serialize to JSON");
        Frame::new(kind, payload)
    }

    /// The payload parsed as JSON `T`.
    pub fn parse_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|source| FrameError::BadJson {
            kind: self.kind,
            source,
        })
    }

    /// The frame's wire bytes. Fails if the payload is larger than [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        encode_into(self.kind, &self.payload, &mut out)?;
        Ok(out.freeze())
    }
}

/// Appends one frame with `payload` to `out`.
pub fn encode_into(kind: FrameKind, payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    out.reserve(HEADER_LEN + payload.len());
    out.put_u8(kind as u8);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// Why bytes are not a valid frame sequence.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "frame kind 0x{kind:02x} is not defined by agent protocol v{}",
        crate::PROTOCOL_MAJOR
    )]
    UnknownKind { kind: u8 },
    #[error("frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: usize },
    #[error("body ended inside a frame ({buffered} bytes of an incomplete frame)")]
    Truncated { buffered: usize },
    #[error("{kind:?} frame payload is not valid JSON: {source}")]
    BadJson {
        kind: FrameKind,
        source: serde_json::Error,
    },
}

/// Reassembles frames from body chunks of any size. Holds at most one incomplete frame plus the
/// chunk being consumed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. A frame header announcing an
    /// unknown kind or an oversized payload is an error as soon as the header is complete, so a
    /// peer cannot make the decoder buffer an oversized frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind_byte = self.buffer[0];
        let kind =
            FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind { kind: kind_byte })?;
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len });
        }
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Call at the end of the body: fails if an incomplete frame remains.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffer.len() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<FrameKind> {
        (0..=255u8).filter_map(FrameKind::from_u8).collect()
    }

    #[test]
    fn round_trips_every_kind_and_boundary_sizes() {
        for kind in all_kinds() {
            for len in [0, 1, 4096, MAX_PAYLOAD] {
                let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let wire = Frame::new(kind, payload.clone()).encode().unwrap();
                assert_eq!(wire.len(), HEADER_LEN + len);
                let mut decoder = FrameDecoder::new();
                decoder.push(&wire);
                let frame = decoder.next_frame().unwrap().unwrap();
                assert_eq!(frame.kind, kind);
                assert_eq!(&frame.payload[..], &payload[..]);
                assert!(decoder.next_frame().unwrap().is_none());
                decoder.finish().unwrap();
            }
        }
    }

    #[test]
    fn reassembles_frames_split_at_every_byte_boundary() {
        let mut wire = BytesMut::new();
        encode_into(FrameKind::Stdout, b"hello", &mut wire).unwrap();
        encode_into(FrameKind::Stderr, b"", &mut wire).unwrap();
        encode_into(FrameKind::Exit, br#"{"code":3}"#, &mut wire).unwrap();
        for split in 0..=wire.len() {
            let mut decoder = FrameDecoder::new();
            let mut frames = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                decoder.push(chunk);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    frames.push(frame);
                }
            }
            decoder.finish().unwrap();
            let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
            assert_eq!(
                kinds,
                [FrameKind::Stdout, FrameKind::Stderr, FrameKind::Exit],
                "split {split}"
            );
            assert_eq!(&frames[0].payload[..], b"hello");
            assert_eq!(
                frames[2].parse_json::<crate::ExitStatus>().unwrap().code,
                Some(3)
            );
        }
    }

    #[test]
    fn rejects_unknown_kind() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0x7f, 0, 0, 0, 1, b'x']);
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::UnknownKind { kind: 0x7f })
        ));
    }

    #[test]
    fn rejects_oversized_frame_from_its_header_alone() {
        let mut decoder = FrameDecoder::new();
        let len = (MAX_PAYLOAD as u32 + 1).to_be_bytes();
        decoder.push(&[FrameKind::Stdout as u8, len[0], len[1], len[2], len[3]]);
        assert!(
            matches!(decoder.next_frame(), Err(FrameError::TooLarge { len }) if len == MAX_PAYLOAD + 1)
        );
        assert!(matches!(
            Frame::new(FrameKind::Stdin, vec![0u8; MAX_PAYLOAD + 1]).encode(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_body_is_an_error_at_finish() {
        let wire = Frame::new(FrameKind::Stdin, &b"abcdef"[..])
            .encode()
            .unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.push(&wire[..wire.len() - 1]);
        assert!(decoder.next_frame().unwrap().is_none());
        assert!(
            matches!(decoder.finish(), Err(FrameError::Truncated { buffered }) if buffered == wire.len() - 1)
        );
    }

    #[test]
    fn bad_json_payload_names_the_frame_kind() {
        let frame = Frame::new(FrameKind::Exit, &b"{not json"[..]);
        let err = frame.parse_json::<crate::ExitStatus>().unwrap_err();
        assert!(err.to_string().contains("Exit"), "{err}");
    }
}
