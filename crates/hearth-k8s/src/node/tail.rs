//! The last few KiB of a command's output (stdout and stderr interleaved as they arrive), kept in a
//! bounded buffer so a chatty command cannot grow the node agent's memory or the Sandbox object.

use std::collections::VecDeque;

pub struct OutputTail {
    buf: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl OutputTail {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(cap.min(1 << 16)),
            cap,
            dropped: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = if bytes.len() > self.cap {
            self.dropped += (bytes.len() - self.cap) as u64;
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.dropped += overflow as u64;
        self.buf.extend(bytes);
    }

    /// The kept bytes as text: invalid UTF-8 replaced, and a character cut in half at the start dropped.
    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let start = if self.dropped > 0 {
            bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count()
        } else {
            0
        };
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// Bytes that did not fit (the tail starts mid-output when non-zero).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_bytes() {
        let mut t = OutputTail::new(8);
        t.push(b"hello ");
        t.push(b"world");
        assert_eq!(t.text(), "lo world");
        assert_eq!(t.dropped(), 3);
        t.push(b"0123456789abc");
        assert_eq!(t.text(), "56789abc");
    }

    #[test]
    fn a_split_character_at_the_start_is_dropped_not_garbled() {
        let mut t = OutputTail::new(5);
        t.push("xé1234".as_bytes()); // é is two bytes; the cut falls inside it
        assert_eq!(t.text(), "1234");
    }
}
