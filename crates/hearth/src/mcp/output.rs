//! What goes back to the model is bounded: a command's output keeps its head and its tail (where
//! errors usually are) with a note of what was left out between, file contents are cut at a
//! limit with a note, and bytes that are not UTF-8 are never passed off as text. Pure data.

use std::collections::VecDeque;

/// Output kept per stream of an exec or a code run, bytes (half head, half tail).
pub const STREAM_LIMIT: usize = 32 << 10;
/// Default and largest `max_bytes` of `read_file`.
pub const READ_DEFAULT: u64 = 64 << 10;
pub const READ_MAX: u64 = 1 << 20;
/// Directory entries listed at most.
pub const LIST_MAX: usize = 1000;

/// A stream's first and last bytes, counting what fell between.
#[derive(Debug)]
pub struct HeadTail {
    limit: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    omitted: u64,
}

impl HeadTail {
    pub fn new(limit: usize) -> HeadTail {
        HeadTail {
            limit,
            head: Vec::new(),
            tail: VecDeque::new(),
            omitted: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let head_room = (self.limit / 2).saturating_sub(self.head.len());
        let n = head_room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..n]);
        bytes = &bytes[n..];
        let tail_limit = self.limit - self.limit / 2;
        if bytes.len() >= tail_limit {
            self.omitted += (self.tail.len() + bytes.len() - tail_limit) as u64;
            self.tail.clear();
            bytes = &bytes[bytes.len() - tail_limit..];
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(tail_limit);
        self.tail.drain(..overflow);
        self.omitted += overflow as u64;
        self.tail.extend(bytes);
    }

    /// Whether bytes were left out.
    pub fn truncated(&self) -> bool {
        self.omitted > 0
    }

    /// The text kept, with a note where bytes were left out; invalid UTF-8 shows as U+FFFD.
    pub fn into_text(self) -> String {
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if self.omitted > 0 {
            text.push_str(&format!(
                "\n[... {} bytes left out by hearth mcp ...]\n",
                self.omitted
            ));
        }
        let (a, b) = self.tail.as_slices();
        text.push_str(&String::from_utf8_lossy(&[a, b].concat()));
        text
    }
}

/// `text` bounded to `limit` bytes the same way (head and tail kept).
pub fn bound_text(text: &str, limit: usize) -> (String, bool) {
    let mut kept = HeadTail::new(limit);
    kept.push(text.as_bytes());
    let truncated = kept.truncated();
    (kept.into_text(), truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_passes_unchanged() {
        let mut out = HeadTail::new(16);
        out.push(b"hello ");
        out.push(b"world");
        assert!(!out.truncated());
        assert_eq!(out.into_text(), "hello world");
    }

    #[test]
    fn long_output_keeps_head_and_tail_and_says_how_much_went() {
        let mut out = HeadTail::new(8);
        for chunk in [&b"0123"[..], b"4567", b"89abcdef", b"ghij"] {
            out.push(chunk);
        }
        assert!(out.truncated());
        // 20 bytes: "0123" kept, "ghij" kept, 12 between left out.
        assert_eq!(
            out.into_text(),
            "0123\n[... 12 bytes left out by hearth mcp ...]\nghij"
        );
        let mut one = HeadTail::new(8);
        one.push(&[b'x'; 1000]);
        assert_eq!(
            one.into_text(),
            "xxxx\n[... 992 bytes left out by hearth mcp ...]\nxxxx"
        );
    }

    #[test]
    fn bounding_text_counts_bytes_and_survives_cut_characters() {
        let (text, cut) = bound_text(&"é".repeat(100), 9);
        assert!(cut);
        assert!(text.contains("left out"), "{text}");
        assert_eq!(bound_text("short", 9), ("short".to_string(), false));
    }
}
