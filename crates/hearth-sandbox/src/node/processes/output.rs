//! What the node keeps of a background process's output: the last [`KEPT`] bytes of stdout and
//! stderr as produced, interleaved in order, each byte at a fixed offset in the process's whole
//! output (stdout and stderr counted together). A reader asks for output from an offset and is
//! told where what it gets really starts (later, once older bytes were dropped), so a client that
//! reconnects with the offset it reached sees no byte twice and learns how many it missed.

use std::collections::VecDeque;

use bytes::Bytes;

/// Bytes of output kept per process.
pub const KEPT: usize = 1 << 20;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The kept output of one process (a clone shares its bytes).
#[derive(Debug, Default, Clone)]
pub(super) struct Output {
    /// Chunks in order; the first starts at `start`.
    chunks: VecDeque<(Stream, Bytes)>,
    /// Offset of the first byte kept.
    start: u64,
    /// Offset after the last byte produced (everything ever produced).
    end: u64,
    kept: usize,
    cap: usize,
}

impl Output {
    pub(super) fn new() -> Output {
        Output::with_cap(KEPT)
    }

    /// Kept output whose next byte is at `offset` (the bytes before it are not kept).
    pub(super) fn starting_at(offset: u64) -> Output {
        Output {
            start: offset,
            end: offset,
            ..Output::new()
        }
    }

    fn with_cap(cap: usize) -> Output {
        Output {
            cap,
            ..Default::default()
        }
    }

    /// Appends a chunk, dropping the oldest bytes past the cap.
    pub(super) fn push(&mut self, stream: Stream, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.end += data.len() as u64;
        if data.len() > self.cap {
            // Only its tail can be kept: everything before it goes too.
            let skip = data.len() - self.cap;
            data = data.slice(skip..);
            self.chunks.clear();
            self.kept = 0;
            self.start = self.end - data.len() as u64;
        }
        self.kept += data.len();
        self.chunks.push_back((stream, data));
        while self.kept > self.cap {
            let (stream, front) = self.chunks.pop_front().expect("kept > 0");
            let over = self.kept - self.cap;
            if front.len() > over {
                self.chunks.push_front((stream, front.slice(over..)));
                self.kept -= over;
                self.start += over as u64;
            } else {
                self.kept -= front.len();
                self.start += front.len() as u64;
            }
        }
    }

    /// Offset after the last byte produced.
    pub(super) fn end(&self) -> u64 {
        self.end
    }

    /// Bytes produced but no longer kept.
    pub(super) fn dropped(&self) -> u64 {
        self.start
    }

    /// The first kept chunk (or part of one) at or after `offset`, and the offset it starts at
    /// (past `offset` when the bytes there were dropped); `None` when nothing is kept from there.
    pub(super) fn read(&self, offset: u64) -> Option<(u64, Stream, Bytes)> {
        let mut at = self.start;
        for (stream, chunk) in &self.chunks {
            let next = at + chunk.len() as u64;
            if next > offset {
                let skip = offset.saturating_sub(at) as usize;
                return Some((at.max(offset), *stream, chunk.slice(skip..)));
            }
            at = next;
        }
        None
    }
}

/// Tests': the kept output from `offset` as text, and where it really starts.
#[cfg(test)]
pub(super) fn kept_text(out: &Output, mut offset: u64) -> (u64, String) {
    let first = out.read(offset).map(|(at, _, _)| at).unwrap_or(offset);
    let mut text = String::new();
    while let Some((at, _, chunk)) = out.read(offset) {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        offset = at + chunk.len() as u64;
    }
    (first, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_both_streams_in_order_at_their_offsets() {
        let mut out = Output::new();
        out.push(Stream::Stdout, Bytes::from_static(b"one\n"));
        out.push(Stream::Stderr, Bytes::from_static(b"err\n"));
        out.push(Stream::Stdout, Bytes::from_static(b"two\n"));
        assert_eq!(kept_text(&out, 0), (0, "one\nerr\ntwo\n".into()));
        // From the middle of a chunk: the rest of it, then the others.
        assert_eq!(kept_text(&out, 6), (6, "r\ntwo\n".into()));
        let (at, stream, chunk) = out.read(4).unwrap();
        assert_eq!((at, stream, &chunk[..]), (4, Stream::Stderr, &b"err\n"[..]));
        assert_eq!(out.read(12), None, "nothing past the end");
        assert_eq!((out.end(), out.dropped()), (12, 0));
    }

    #[test]
    fn drops_the_oldest_bytes_past_the_cap_and_says_where_it_starts() {
        let mut out = Output::with_cap(8);
        out.push(Stream::Stdout, Bytes::from_static(b"abcdef"));
        out.push(Stream::Stdout, Bytes::from_static(b"ghij"));
        assert_eq!((out.end(), out.dropped()), (10, 2));
        // A reader at 0 gets what is kept, told that it starts at 2.
        assert_eq!(kept_text(&out, 0), (2, "cdefghij".into()));
        assert_eq!(kept_text(&out, 9), (9, "j".into()));
        // One chunk bigger than the cap: only its tail stays.
        out.push(Stream::Stderr, Bytes::from_static(b"0123456789AB"));
        assert_eq!((out.end(), out.dropped()), (22, 14));
        assert_eq!(kept_text(&out, 3), (14, "456789AB".into()));
        out.push(Stream::Stdout, Bytes::new());
        assert_eq!(out.end(), 22, "an empty chunk changes nothing");
    }
}
