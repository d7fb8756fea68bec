//! The session handshake: text lines exchanged before HTTP/2 starts, plus [`LineBuffer`], which
//! both ends use to find those lines among stale bytes.
//!
//! Host: `HEARTH-AGENT/1 HELLO <nonce-hex>\n`; guest: `HEARTH-AGENT/1 READY <nonce-hex> <version>\n`.
//! The guest also writes `HEARTH-AGENT/1 WAITING\n` when it starts waiting for a HELLO, so a host
//! that is already connected (a booting VM) says HELLO at once instead of at its next retry.
//! A VM restored from a snapshot template additionally gets
//! `HEARTH-AGENT/1 RESUME <unix-time-ns> <seed-hex> <hostname>\n` before the HELLO: what differs
//! between clones of one template (wall clock, entropy, hostname). A running VM restored from its own
//! saved state (a paused sandbox resumed) gets one too; its agent applies the clock and entropy.
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
    /// The host restored this VM from a template: the per-clone state the guest must apply before
    /// answering HELLO. Only a major-1 line parses as RESUME (its fields are this major's).
    Resume(Resume),
}

/// Length of the entropy seed a RESUME carries, in bytes (sent as twice as many hex digits).
pub const RESUME_SEED_LEN: usize = 32;

/// What a VM restored from a template needs from the host, because every clone of the template
/// would otherwise share the template's clock, CRNG state and hostname.
#[derive(Clone, PartialEq, Eq)]
pub struct Resume {
    /// Host wall clock, nanoseconds since the Unix epoch (u64 lasts until the year 2554).
    pub unix_time_ns: u64,
    /// Fresh random bytes from the host, mixed into the guest's CRNG (credited as full entropy).
    pub seed: [u8; RESUME_SEED_LEN],
    /// The VM's hostname: 1-63 characters of `[A-Za-z0-9-]` (see [`is_resume_hostname`]).
    pub hostname: String,
}

impl std::fmt::Debug for Resume {
    /// Leaves the seed out: it keys the guest's CRNG, so it must not end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume")
            .field("unix_time_ns", &self.unix_time_ns)
            .field("seed", &"<redacted>")
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// Whether `name` is a hostname a RESUME line may carry: one DNS label of 1-63 characters of
/// `[A-Za-z0-9-]` (no dots, so no spaces or control bytes can reach the line or `sethostname`).
pub fn is_resume_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
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

/// What the host sends to a VM restored from a template, before its HELLO (same leading newline).
/// The caller validates the hostname with [`is_resume_hostname`] first: a line carrying another
/// hostname does not parse on the guest, which then never answers HELLO.
pub fn resume_line(resume: &Resume) -> String {
    let seed: String = resume.seed.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "\n{MAGIC}/{PROTOCOL_MAJOR} RESUME {} {seed} {}\n",
        resume.unix_time_ns, resume.hostname
    )
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
    if verb == "RESUME" {
        if major != PROTOCOL_MAJOR {
            return None;
        }
        let resume = parse_resume(&mut words)?;
        return words
            .next()
            .is_none()
            .then_some(HandshakeLine::Resume(resume));
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

fn parse_resume<'a>(words: &mut impl Iterator<Item = &'a str>) -> Option<Resume> {
    let time = words.next()?;
    if time.is_empty() || time.len() > 20 || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let unix_time_ns = time.parse().ok()?;
    let seed_hex = words.next()?.as_bytes();
    if seed_hex.len() != 2 * RESUME_SEED_LEN {
        return None;
    }
    let mut seed = [0u8; RESUME_SEED_LEN];
    for (byte, pair) in seed.iter_mut().zip(seed_hex.chunks_exact(2)) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    let hostname = words.next().filter(|h| is_resume_hostname(h))?.to_string();
    Some(Resume {
        unix_time_ns,
        seed,
        hostname,
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
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

    fn sample_resume() -> Resume {
        let mut seed = [0u8; RESUME_SEED_LEN];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0xA5;
        }
        Resume {
            unix_time_ns: 1_717_171_717_123_456_789,
            seed,
            hostname: "hearth-0a1B".into(),
        }
    }

    #[test]
    fn resume_round_trips_with_the_documented_format() {
        let resume = sample_resume();
        let line = resume_line(&resume);
        let seed_hex: String = resume.seed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            line,
            format!("\nHEARTH-AGENT/1 RESUME 1717171717123456789 {seed_hex} hearth-0a1B\n")
        );
        assert_eq!(
            parse_line(line.trim().as_bytes()),
            Some(HandshakeLine::Resume(resume.clone()))
        );
        let upper = format!(
            "HEARTH-AGENT/1 RESUME 0 {} h\r",
            seed_hex.to_ascii_uppercase()
        );
        let Some(HandshakeLine::Resume(parsed)) = parse_line(upper.as_bytes()) else {
            panic!("upper-case seed must parse: {upper}");
        };
        assert_eq!((parsed.unix_time_ns, parsed.seed), (0, resume.seed));
        assert_eq!(
            parse_line(format!("HEARTH-AGENT/1 RESUME {} {seed_hex} h", u64::MAX).as_bytes()),
            Some(HandshakeLine::Resume(Resume {
                unix_time_ns: u64::MAX,
                seed: resume.seed,
                hostname: "h".into()
            }))
        );
    }

    #[test]
    fn resume_debug_output_hides_the_seed() {
        let resume = sample_resume();
        let debug = format!("{resume:?}");
        assert!(debug.contains("hearth-0a1B") && debug.contains("<redacted>"));
        assert!(!debug.contains("seed: ["), "{debug}");
    }

    #[test]
    fn rejects_malformed_resume_lines() {
        let seed = "ab".repeat(RESUME_SEED_LEN);
        let bad = [
            format!("HEARTH-AGENT/1 RESUME 1 {seed}"),
            format!("HEARTH-AGENT/1 RESUME 1 {seed} host extra"),
            format!("HEARTH-AGENT/1 RESUME -1 {seed} host"),
            format!("HEARTH-AGENT/1 RESUME +1 {seed} host"),
            format!("HEARTH-AGENT/1 RESUME  {seed} host"),
            format!("HEARTH-AGENT/1 RESUME 18446744073709551616 {seed} host"),
            format!("HEARTH-AGENT/1 RESUME 1 {} host", &seed[1..]),
            format!("HEARTH-AGENT/1 RESUME 1 {seed}ab host"),
            format!("HEARTH-AGENT/1 RESUME 1 {}zz host", &seed[2..]),
            format!("HEARTH-AGENT/1 RESUME 1 {seed} host.example"),
            format!("HEARTH-AGENT/1 RESUME 1 {seed} host_1"),
            format!("HEARTH-AGENT/1 RESUME 1 {seed} {}", "h".repeat(64)),
            format!("HEARTH-AGENT/2 RESUME 1 {seed} host"),
        ];
        for line in bad {
            assert_eq!(parse_line(line.as_bytes()), None, "{line:?}");
        }
        assert!(is_resume_hostname(&"h".repeat(63)));
        assert!(!is_resume_hostname(""));
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
