//! A compromised guest agent for attack tests: it completes the real handshake on one end of a
//! Unix socket pair, then misbehaves on HTTP/2, either through the `h2` crate's server side (for
//! attacks that stay within the protocol: never answering, endless bodies) or with frames written
//! by hand (for attacks a well-behaved library refuses to send: PUSH_PROMISE floods, huge header
//! blocks). It is the attacker, so it is a fake by design; the host side under test is real.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hearth_proto::handshake::{self, HandshakeLine, LineBuffer, HTTP2_PREFACE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Reads up to the host's HELLO, answers READY with its nonce, and returns the bytes after the
/// HTTP/2 preface's start (the preface included), skipping any HELLO the host repeated meanwhile.
pub async fn handshake(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut lines = LineBuffer::new();
    let mut buf = vec![0u8; 4096];
    let nonce = 'hello: loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        lines.push(&buf[..n]);
        while let Some(line) = lines.next_line() {
            if let Some(HandshakeLine::Hello { nonce, .. }) = handshake::parse_line(&line) {
                break 'hello nonce;
            }
        }
    };
    let ready = handshake::ready_line(&nonce, "hostile-0.0.0");
    stream.write_all(ready.as_bytes()).await?;
    let mut seen = Vec::new();
    loop {
        if let Some(at) = seen
            .windows(HTTP2_PREFACE.len())
            .position(|w| w == HTTP2_PREFACE)
        {
            return Ok(seen.split_off(at));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
}

/// `stream` with `prefix` read first.
pub fn prefixed(prefix: Vec<u8>, stream: UnixStream) -> impl AsyncRead + AsyncWrite + Unpin {
    let (read, write) = tokio::io::split(stream);
    tokio::io::join(std::io::Cursor::new(prefix).chain(read), write)
}

/// What a hostile agent built on the `h2` server does with each request.
#[derive(Clone, Copy, Debug)]
pub enum H2Attack {
    /// Accepts every request and never answers (nor resets it).
    NeverAnswer,
    /// Answers 200 and then sends body bytes for ever, as fast as flow control allows.
    EndlessBody,
    /// Answers 200 with an exec `Started` frame, then `Stdout` frames for ever, as fast as flow
    /// control allows.
    EndlessExecOutput,
}

/// Spawns a hostile agent on `guest` using the `h2` server.
pub fn spawn_h2(mut guest: UnixStream, attack: H2Attack) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(rest) = handshake(&mut guest).await else {
            return;
        };
        let Ok(mut conn) = h2::server::handshake(prefixed(rest, guest)).await else {
            return;
        };
        let mut held = Vec::new();
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            match attack {
                H2Attack::NeverAnswer => held.push((request, respond)),
                H2Attack::EndlessBody | H2Attack::EndlessExecOutput => {
                    tokio::spawn(async move {
                        let response = http::Response::builder().status(200).body(()).unwrap();
                        let Ok(mut send) = respond.send_response(response, false) else {
                            return;
                        };
                        let chunk = match attack {
                            H2Attack::EndlessExecOutput => {
                                let started = hearth_proto::ExecStarted { id: 1, pid: 1 };
                                let first = hearth_proto::Frame::json(
                                    hearth_proto::FrameKind::Started,
                                    &started,
                                )
                                .encode()
                                .unwrap();
                                if send_within_window(&mut send, first).await.is_err() {
                                    return;
                                }
                                hearth_proto::Frame::new(
                                    hearth_proto::FrameKind::Stdout,
                                    vec![b'x'; 16 * 1024],
                                )
                                .encode()
                                .unwrap()
                            }
                            _ => Bytes::from(vec![b' '; 16 * 1024]),
                        };
                        while send_within_window(&mut send, chunk.clone()).await.is_ok() {}
                        drop(request);
                    });
                }
            }
        }
    })
}

/// Sends `data` only as the host's window allows, so this side buffers nothing: whatever memory
/// grows in the test process is the host's.
async fn send_within_window(send: &mut h2::SendStream<Bytes>, mut data: Bytes) -> Result<(), ()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = loop {
            match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
                _ => return Err(()),
            }
        };
        let piece = data.split_to(capacity.min(data.len()));
        send.send_data(piece, false).map_err(|_| ())?;
    }
    Ok(())
}

/// What a hostile agent writing raw HTTP/2 frames does once the host's first request arrives.
#[derive(Clone, Copy, Debug)]
pub enum RawAttack {
    /// PUSH_PROMISE frames on the request's stream, each promising a new stream, for ever.
    PushPromiseFlood,
    /// A response HEADERS frame followed by CONTINUATION frames for ever, carrying 4 KiB headers.
    HugeHeaders,
}

/// Spawns a hostile agent on `guest` that answers with raw frames. Returns how many bytes of
/// attack frames it managed to write before the host stopped reading or closed the connection.
pub fn spawn_raw(mut guest: UnixStream, attack: RawAttack) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let Ok(rest) = handshake(&mut guest).await else {
            return 0;
        };
        let mut io = prefixed(rest[HTTP2_PREFACE.len()..].to_vec(), guest);
        // Our (empty) SETTINGS; the host's frames are read and SETTINGS acknowledged until its
        // first request's HEADERS arrives.
        if io.write_all(&frame(4, 0, 0, &[])).await.is_err() {
            return 0;
        }
        let stream_id = loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return 0;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return 0;
            }
            if kind == 4 && flags & 1 == 0 {
                let _ = io.write_all(&frame(4, 1, 0, &[])).await;
            }
            if kind == 1 {
                break id;
            }
        };
        let mut written = 0u64;
        match attack {
            RawAttack::PushPromiseFlood => {
                let mut promised = 2u32;
                loop {
                    let mut block = BytesMut::new();
                    block.put_u32(promised);
                    // :method GET, :scheme http, :path /, :authority as a literal.
                    block.put_slice(&[0x82, 0x86, 0x84, 0x01, 0x01, b'x']);
                    // END_HEADERS
                    let f = frame(5, 0x4, stream_id, &block);
                    if io.write_all(&f).await.is_err() {
                        return written;
                    }
                    written += f.len() as u64;
                    promised += 2;
                    if promised > 0x7fff_0000 {
                        return written;
                    }
                }
            }
            RawAttack::HugeHeaders => {
                // An endless header block of ordinary-looking 4 KiB headers, cut into the largest
                // frames the host allows (its SETTINGS_MAX_FRAME_SIZE, 64 KiB).
                let mut entry = BytesMut::new();
                entry.put_u8(0x00); // literal without indexing, new name
                hpack_int(&mut entry, 7, 0, 7);
                entry.put_slice(b"x-flood");
                hpack_int(&mut entry, 7, 0, 4096);
                entry.put_slice(&[b'a'; 4096]);
                let mut block = vec![0x88]; // :status 200
                let mut kind = 1; // HEADERS (without END_HEADERS), then CONTINUATION
                loop {
                    while block.len() < 64 * 1024 {
                        block.extend_from_slice(&entry);
                    }
                    let rest = block.split_off(64 * 1024);
                    let f = frame(kind, 0, stream_id, &block);
                    block = rest;
                    kind = 9;
                    // A host that stopped reading would block this write for ever.
                    match tokio::time::timeout(Duration::from_secs(5), io.write_all(&f)).await {
                        Ok(Ok(())) => written += f.len() as u64,
                        _ => return written,
                    }
                    if written > 1 << 30 {
                        return written;
                    }
                }
            }
        }
    })
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with a `prefix_bits`-bit prefix; `first` holds the bits above the prefix.
fn hpack_int(out: &mut BytesMut, prefix_bits: u32, first: u8, value: u64) {
    let max = (1u64 << prefix_bits) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

/// The test process's peak resident memory (`VmHWM`), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}
