//! The session handshake: text lines exchanged before HTTP/2 starts, plus [`LineBuffer`], which
//! both ends use to find those lines among stale bytes.
//!
//! Host: `HEARTH-AGENT/1 HELLO <nonce-hex>\n`; guest: `HEARTH-AGENT/1 READY <nonce-hex> <version>\n`.
//! The guest also writes `HEARTH-AGENT/1 WAITING\n` when it starts waiting for a HELLO, so a host
//! that is already connected (a booting VM) says HELLO at once instead of at its next retry.
//! Text lines let either end skip whatever an earlier session left in the byte stream. Pure byte
//! handling: no I/O.

/// Protocol major version. A peer announcing another major version is incompatible.
pub const PROTOCOL_MAJOR: u32 = 1;

/// Prefix of every handshake line, before `/<major>`.
pub const MAGIC: &str = "HEARTH-AGENT";

/// The HTTP/2 client connection preface; after answering HELLO the guest waits for it.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Lines longer than this are not handshake lines; [`LineBuffer`] drops them without buffering them.
pub const MAX_LINE: usize = 512;

/// A parsed handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeLine {
    /// The guest waits for a HELLO (sent unprompted; the host answers with HELLO at once).
    Waiting {
        major: u32,
    },
    Hello {
        major: u32,
        nonce: String,
    },
    Ready {
        major: u32,
        nonce: String,
        agent_version: String,
    },
}

/// What the host sends. The leading newline ends whatever partial line stale bytes left (an old
/// session's binary HTTP/2 frames), so the HELLO always starts a line of its own.
pub fn hello_line(nonce: &str) -> String {
    format!("\n{MAGIC}/{PROTOCOL_MAJOR} HELLO {nonce}\n")
}

/// What the guest writes when it starts waiting for a HELLO.
pub fn waiting_line() -> String {
    format!("\n{MAGIC}/{PROTOCOL_MAJOR} WAITING\n")
}

/// What the guest answers, with a leading newline for the same reason.
pub fn ready_line(nonce: &str, agent_version: &str) -> String {
    format!("\n{MAGIC}/{PROTOCOL_MAJOR} READY {nonce} {agent_version}\n")
}

/// Parses one line (without its `\n`; a trailing `\r` is tolerated). `None`: not a handshake line,
/// which the caller skips as stale bytes.
pub fn parse_line(line: &[u8]) -> Option<HandshakeLine> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut words = line.split(' ');
    let major = words
        .next()?
        .strip_prefix(MAGIC)?
        .strip_prefix('/')?
        .parse()
        .ok()?;
    let verb = words.next()?;
    if verb == "WAITING" {
        return words
            .next()
            .is_none()
            .then_some(HandshakeLine::Waiting { major });
    }
    let nonce = words.next().filter(|n| is_nonce(n))?.to_string();
    let parsed = match verb {
        "HELLO" => HandshakeLine::Hello { major, nonce },
        "READY" => {
            let agent_version = words.next().filter(|v| is_version(v))?.to_string();
            HandshakeLine::Ready {
                major,
                nonce,
                agent_version,
            }
        }
        _ => return None,
    };
    words.next().is_none().then_some(parsed)
}

fn is_nonce(word: &str) -> bool {
    (1..=64).contains(&word.len()) && word.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_version(word: &str) -> bool {
    (1..=64).contains(&word.len()) && word.bytes().all(|b| b.is_ascii_graphic())
}

/// How the start of a buffer relates to the HTTP/2 preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefaceMatch {
    /// The buffer starts with the whole preface.
    Complete,
    /// The buffer is a proper prefix of the preface (possibly empty): wait for more bytes.
    Partial,
    /// The buffer does not start with the preface.
    No,
}

/// Accumulates stream bytes and splits them into lines, dropping overlong lines so stale binary data
/// cannot make it buffer without limit.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buffer: Vec<u8>,
    /// Inside an overlong line: drop bytes up to the next newline.
    discarding: bool,
}

impl LineBuffer {
    pub fn new() -> LineBuffer {
        LineBuffer::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete line without its newline, or `None` until one is complete.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.buffer.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                    line.pop();
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    return Some(line);
                }
                None => {
                    if self.buffer.len() > MAX_LINE {
                        self.buffer.clear();
                        self.discarding = true;
                    }
                    return None;
                }
            }
        }
    }

    /// Whether the unconsumed bytes start with the HTTP/2 preface.
    pub fn preface(&self) -> PrefaceMatch {
        if self.discarding {
            return PrefaceMatch::No;
        }
        let n = self.buffer.len().min(HTTP2_PREFACE.len());
        if self.buffer[..n] != HTTP2_PREFACE[..n] {
            PrefaceMatch::No
        } else if n == HTTP2_PREFACE.len() {
            PrefaceMatch::Complete
        } else {
            PrefaceMatch::Partial
        }
    }

    /// Takes the unconsumed bytes (the start of the HTTP/2 stream once the handshake is done).
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.discarding = false;
        std::mem::take(&mut self.buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_and_ready_round_trip() {
        let hello = hello_line("00ff");
        assert_eq!(hello, "\nHEARTH-AGENT/1 HELLO 00ff\n");
        assert_eq!(
            parse_line(hello.trim().as_bytes()),
            Some(HandshakeLine::Hello {
                major: 1,
                nonce: "00ff".into()
            })
        );
        let ready = ready_line("00ff", "0.1.0");
        assert_eq!(
            parse_line(ready.trim().as_bytes()),
            Some(HandshakeLine::Ready {
                major: 1,
                nonce: "00ff".into(),
                agent_version: "0.1.0".into()
            })
        );
    }

    #[test]
    fn waiting_line_parses_and_takes_no_arguments() {
        let waiting = waiting_line();
        assert_eq!(waiting, "\nHEARTH-AGENT/1 WAITING\n");
        assert_eq!(
            parse_line(waiting.trim().as_bytes()),
            Some(HandshakeLine::Waiting { major: 1 })
        );
        assert_eq!(parse_line(b"HEARTH-AGENT/1 WAITING extra"), None);
    }

    #[test]
    fn other_major_versions_parse_so_they_can_be_reported() {
        assert_eq!(
            parse_line(b"HEARTH-AGENT/2 READY ab 2.0.0\r"),
            Some(HandshakeLine::Ready {
                major: 2,
                nonce: "ab".into(),
                agent_version: "2.0.0".into()
            })
        );
    }

    #[test]
    fn rejects_lines_that_are_not_handshake_lines() {
        for line in [
            &b""[..],
            b"HEARTH-AGENT/1 HELLO",
            b"HEARTH-AGENT/1 HELLO xyz",
            b"HEARTH-AGENT/1 HELLO ab extra",
            b"HEARTH-AGENT/x HELLO ab",
            b"HEARTH-AGENT/1 READY ab",
            b"HEARTH-AGENT/1 BYE ab",
            b"\x00\x00\x00\x04\x01HEARTH-AGENT/1 HELLO ab",
            b"PRI * HTTP/2.0\r",
        ] {
            assert_eq!(
                parse_line(line),
                None,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn line_buffer_skips_overlong_garbage_and_finds_the_next_line() {
        let mut lines = LineBuffer::new();
        lines.push(&vec![0xAB; MAX_LINE + 10]);
        assert_eq!(lines.next_line(), None);
        assert!(
            lines.buffer.is_empty(),
            "overlong garbage must not be buffered"
        );
        lines.push(b"more garbage\nHEARTH-AGENT/1 HELLO 01\nPRI");
        assert_eq!(
            lines.next_line().as_deref(),
            Some(&b"HEARTH-AGENT/1 HELLO 01"[..])
        );
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.preface(), PrefaceMatch::Partial);
        lines.push(&HTTP2_PREFACE[3..]);
        lines.push(b"\x00\x00");
        assert_eq!(lines.preface(), PrefaceMatch::Complete);
        let rest = lines.take_rest();
        assert!(rest.starts_with(HTTP2_PREFACE) && rest.ends_with(b"\x00\x00"));
    }

    #[test]
    fn preface_mismatch_is_reported() {
        let mut lines = LineBuffer::new();
        assert_eq!(lines.preface(), PrefaceMatch::Partial);
        lines.push(b"HEARTH");
        assert_eq!(lines.preface(), PrefaceMatch::No);
    }
}
