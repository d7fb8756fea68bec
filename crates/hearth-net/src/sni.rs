//! The server name a connection asks for, read from its first bytes: the `server_name` of a TLS
//! ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), or the `Host` of an HTTP/1.x request. The proxy
//! feeds it what it has read so far and gets [`ServerName::NeedMore`] until it can tell. Reads at
//! most [`MAX_PEEK`] bytes; never panics on any input (fuzzed: fuzz/fuzz_targets/sni.rs).
//!
//! Only the first request of an HTTP connection is looked at, and a TLS connection's inner HTTP
//! Host is not visible: a client that names an allowed server first can still ask that server
//! for another host (domain fronting). The check keeps honest tools and careless agents to
//! the allowed names; it is not a content filter.

/// The most bytes ever looked at.
pub const MAX_PEEK: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    /// Not decided yet: read more (unless [`MAX_PEEK`] bytes are in already, which never happens
    /// since that decides [`ServerName::Absent`]).
    NeedMore,
    /// The name asked for: lowercase, no trailing dot, no port.
    Found(String),
    /// No usable name: neither TLS nor HTTP, no SNI / Host, malformed, or too long.
    Absent,
}

/// The server name in `buf`, the first bytes a client sent.
pub fn server_name(buf: &[u8]) -> ServerName {
    let buf = &buf[..buf.len().min(MAX_PEEK)];
    let outcome = match buf.first() {
        None => return ServerName::NeedMore,
        Some(0x16) => tls_server_name(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Outcome::Absent,
    };
    match outcome {
        Outcome::NeedMore if buf.len() >= MAX_PEEK => ServerName::Absent,
        Outcome::NeedMore => ServerName::NeedMore,
        Outcome::Absent => ServerName::Absent,
        Outcome::Found(name) => match clean_name(&name) {
            Some(n) => ServerName::Found(n),
            None => ServerName::Absent,
        },
    }
}

enum Outcome {
    NeedMore,
    Found(Vec<u8>),
    Absent,
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// Collects the handshake bytes carried by the leading handshake records (a ClientHello may span
/// several), then parses the ClientHello.
fn tls_server_name(buf: &[u8]) -> Outcome {
    let mut records = Reader { buf };
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        let Some(header) = records.take(5) else {
            return Outcome::NeedMore;
        };
        if header[0] != 0x16 || header[1] != 0x03 {
            return Outcome::Absent;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > (1 << 14) {
            return Outcome::Absent;
        }
        let fragment = records.take(len);
        let partial = fragment.is_none();
        // A partial record is parsed too: the name often sits in its first bytes already.
        handshake.extend_from_slice(fragment.unwrap_or(records.buf));
        match client_hello_name(&handshake) {
            Ok(Some(name)) => return Outcome::Found(name.to_vec()),
            Ok(None) if !partial => return Outcome::Absent,
            Ok(None) | Err(Incomplete) if partial => return Outcome::NeedMore,
            _ => continue,
        }
    }
}

struct Incomplete;

/// `Ok(Some(name))`, `Ok(None)` when complete (or malformed) without a usable name, `Err` when more
/// bytes are needed.
fn client_hello_name(hs: &[u8]) -> Result<Option<&[u8]>, Incomplete> {
    let mut r = Reader { buf: hs };
    let (Some(kind), Some(len)) = (r.u8(), r.u24()) else {
        return Err(Incomplete);
    };
    if kind != 1 {
        return Ok(None);
    }
    if len > MAX_PEEK {
        return Ok(None);
    }
    let body = match r.take(len) {
        Some(body) => body,
        // Parse the partial body: if the name is already in it, no need to wait.
        None => r.buf,
    };
    let complete = body.len() == len;
    let mut b = Reader { buf: body };
    let parsed = (|| {
        b.take(2 + 32)?; // legacy_version, random
        b.vec8()?; // legacy_session_id
        b.vec16()?; // cipher_suites
        b.vec8()?; // legacy_compression_methods
        Some(())
    })();
    if parsed.is_none() {
        return if complete { Ok(None) } else { Err(Incomplete) };
    }
    if b.buf.is_empty() && complete {
        return Ok(None); // no extensions at all
    }
    let Some(ext_len) = b.u16() else {
        return if complete { Ok(None) } else { Err(Incomplete) };
    };
    let mut exts = Reader {
        buf: &b.buf[..ext_len.min(b.buf.len())],
    };
    while !exts.buf.is_empty() {
        let (Some(ty), Some(data)) = (exts.u16(), exts.vec16()) else {
            break;
        };
        if ty != 0 {
            continue;
        }
        let mut list = Reader { buf: data };
        let Some(names) = list.vec16() else {
            return Ok(None);
        };
        let mut names = Reader { buf: names };
        while let (Some(name_type), Some(name)) = (names.u8(), names.vec16()) {
            if name_type == 0 {
                return Ok(Some(name));
            }
        }
        return Ok(None);
    }
    if complete {
        Ok(None)
    } else {
        Err(Incomplete)
    }
}

/// The Host of an HTTP/1.x request, once its header block is complete.
fn http_host(buf: &[u8]) -> Outcome {
    // The method: uppercase token then a space, checked early so other protocols fail fast.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len <= 16 {
            Outcome::NeedMore
        } else {
            Outcome::Absent
        };
    }
    if method_len > 16 || buf[method_len] != b' ' {
        return Outcome::Absent;
    }
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Outcome::NeedMore;
    };
    let head = &buf[..end];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(request_line) = lines.next() else {
        return Outcome::Absent;
    };
    let mut parts = request_line.split(|&b| b == b' ');
    let (_method, Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Outcome::Absent;
    };
    if !version.starts_with(b"HTTP/1.") {
        return Outcome::Absent;
    }
    let mut host: Option<&[u8]> = None;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Outcome::Absent;
        };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Outcome::Absent; // two Hosts: ambiguous, as RFC 9112 §3.2 says
            }
            host = Some(trim(&line[colon + 1..]));
        }
    }
    // An absolute-form target names the host itself; it must agree with Host.
    let target_host = target
        .strip_prefix(b"http://")
        .or_else(|| target.strip_prefix(b"https://"))
        .map(|rest| {
            let end = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?' || b == b'#')
                .unwrap_or(rest.len());
            &rest[..end]
        });
    let authority = match (host, target_host) {
        (Some(h), Some(t)) if !strip_port(h).eq_ignore_ascii_case(strip_port(t)) => {
            return Outcome::Absent
        }
        (Some(h), _) => h,
        (None, Some(t)) => t,
        (None, None) => return Outcome::Absent,
    };
    Outcome::Found(strip_port(authority).to_vec())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// `host:port` -> `host`; `[v6]:port` -> `v6`.
fn strip_port(authority: &[u8]) -> &[u8] {
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    if let Some(rest) = authority.strip_prefix(b"[") {
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => &rest[..end],
            None => rest,
        };
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if authority[colon + 1..].iter().all(u8::is_ascii_digit) => &authority[..colon],
        _ => authority,
    }
}

/// A printable, plausible host name, lowercase and without a trailing dot.
fn clean_name(name: &[u8]) -> Option<String> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    if !name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    {
        return None;
    }
    Some(String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal, well-formed ClientHello naming `sni` (when given), as bytes on the wire.
    pub(crate) fn client_hello(sni: Option<&str>, padding: usize, record: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        // padding extension (21), before the name so that the name comes late
        exts.extend_from_slice(&[0, 21]);
        exts.extend_from_slice(&(padding as u16).to_be_bytes());
        exts.extend(std::iter::repeat_n(0u8, padding));
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut wire = Vec::new();
        for chunk in hs.chunks(record) {
            wire.extend_from_slice(&[0x16, 3, 1]);
            wire.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            wire.extend_from_slice(chunk);
        }
        wire
    }

    fn found(s: &str) -> ServerName {
        ServerName::Found(s.into())
    }

    #[test]
    fn tls_client_hello() {
        let hello = client_hello(Some("API.Example.com."), 100, 1 << 14);
        assert_eq!(server_name(&hello), found("api.example.com"));
        // Every proper prefix needs more, or already has the name.
        for cut in 0..hello.len() {
            let got = server_name(&hello[..cut]);
            assert!(
                got == ServerName::NeedMore || got == found("api.example.com"),
                "{cut}: {got:?}"
            );
        }
        assert_eq!(
            server_name(&client_hello(None, 10, 1 << 14)),
            ServerName::Absent
        );
        // A ClientHello spanning several records, the name in the last.
        let split = client_hello(Some("late.example.com"), 300, 100);
        assert_eq!(server_name(&split), found("late.example.com"));
        for cut in 0..split.len() - 20 {
            assert_eq!(server_name(&split[..cut]), ServerName::NeedMore, "{cut}");
        }
        let split_nameless = client_hello(None, 300, 100);
        assert_eq!(server_name(&split_nameless), ServerName::Absent);
        let mut not_handshake = hello.clone();
        not_handshake[0] = 0x17;
        assert_eq!(server_name(&not_handshake), ServerName::Absent);
        let mut bad_name = client_hello(Some("a b.test"), 0, 1 << 14);
        assert_eq!(server_name(&bad_name), ServerName::Absent);
        bad_name.truncate(20);
        assert_eq!(server_name(&bad_name), ServerName::NeedMore);
    }

    #[test]
    fn http_host() {
        let table: Vec<(&[u8], ServerName)> = vec![
            (
                b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n",
                found("example.com"),
            ),
            (
                b"GET / HTTP/1.1\r\nhost:example.com\r\n\r\nBODY",
                found("example.com"),
            ),
            (
                b"GET / HTTP/1.0\r\nHost: [2001:db8::1]:80\r\n\r\n",
                found("2001:db8::1"),
            ),
            (
                b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
                found("a.test"),
            ),
            (b"GET http://a.test:80/x HTTP/1.1\r\n\r\n", found("a.test")),
            (
                b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n",
                ServerName::Absent,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
                ServerName::Absent,
            ),
            (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", ServerName::Absent),
            (b"GET / HTTP/1.1\r\nHost: a.test\r\n", ServerName::NeedMore),
            (b"GE", ServerName::NeedMore),
            (b"GET", ServerName::NeedMore),
            (b"GET / HTTP/2\r\nHost: a.test\r\n\r\n", ServerName::Absent),
            (b"SSH-2.0-OpenSSH\r\n", ServerName::Absent),
            (b"\x00\x01", ServerName::Absent),
            (b"", ServerName::NeedMore),
        ];
        for (input, want) in table {
            assert_eq!(
                server_name(input),
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn bounded() {
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(MAX_PEEK - 1, b'a');
        assert_eq!(server_name(&endless), ServerName::NeedMore);
        endless.resize(MAX_PEEK + 10, b'a');
        assert_eq!(server_name(&endless), ServerName::Absent);
        // A TLS record announcing more than a ClientHello may be.
        let mut huge = vec![0x16, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        huge.resize(MAX_PEEK + 1, 0);
        assert_eq!(server_name(&huge), ServerName::Absent);
    }

    proptest::proptest! {
        /// Arbitrary first bytes: no panic, and a name found is a plausible lowercase host name.
        #[test]
        fn arbitrary_bytes(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                           tls in proptest::prelude::any::<bool>()) {
            let mut data = data;
            if tls && data.len() > 5 {
                data[..3].copy_from_slice(&[0x16, 3, 1]);
            }
            if let ServerName::Found(n) = server_name(&data) {
                proptest::prop_assert!(n.len() <= 253 && n.is_ascii() && n == n.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn never_panics_on_mangled_hellos() {
        let hello = client_hello(Some("api.example.com"), 40, 50);
        for i in 0..hello.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut m = hello.clone();
                m[i] = v;
                let _ = server_name(&m);
                let _ = server_name(&m[..i]);
            }
        }
    }
}
