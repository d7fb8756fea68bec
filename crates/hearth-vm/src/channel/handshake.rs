//! The host side of the session handshake: send `HELLO <nonce>` at once, again whenever the guest
//! says it is `WAITING`, and every 250 ms otherwise, until the exact `READY <nonce>` line arrives,
//! skipping whatever an earlier session or a booting guest left in the stream. (Retrying much faster
//! instead slows a booting guest under TCG: each HELLO is an interrupt.) To a VM restored from a
//! snapshot template, a RESUME line goes before every HELLO: the guest applies the first it sees and
//! ignores the rest, so a guest session that started after the first one was sent still gets one.

use std::io;
use std::time::Duration;

use hearth_proto::handshake::{self, HandshakeLine, LineBuffer, Resume};
use hearth_proto::PROTOCOL_MAJOR;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ChannelError;

/// How often HELLO is repeated while the guest does not answer.
pub const HELLO_INTERVAL: Duration = Duration::from_millis(250);

/// What the agent announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub agent_version: String,
    /// Bytes read after the READY line (the start of the HTTP/2 stream).
    pub rest: Vec<u8>,
}

/// Runs the handshake on `io`. Waits for ever; bound it with a timeout.
pub async fn hello<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<Ready, ChannelError> {
    hello_resuming(io, None).await
}

/// [`hello`], with `resume` (for a VM restored from a template) sent before each HELLO.
pub async fn hello_resuming<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    resume: Option<&Resume>,
) -> Result<Ready, ChannelError> {
    let nonce = random_nonce()?;
    let mut hello = String::new();
    if let Some(resume) = resume {
        if !handshake::is_resume_hostname(&resume.hostname) {
            return Err(ChannelError::Protocol(format!(
                "hostname {:?} cannot go in a RESUME line: use 1-63 characters of [A-Za-z0-9-]",
                resume.hostname
            )));
        }
        hello.push_str(&handshake::resume_line(resume));
    }
    hello.push_str(&handshake::hello_line(&nonce));
    send_hello(io, &hello)
        .await
        .map_err(|e| ChannelError::io("sending HELLO to the agent", e))?;
    let mut lines = LineBuffer::new();
    let mut chunk = vec![0u8; 4096];
    let mut resend =
        tokio::time::interval_at(tokio::time::Instant::now() + HELLO_INTERVAL, HELLO_INTERVAL);
    loop {
        while let Some(line) = lines.next_line() {
            if let Some(HandshakeLine::Waiting { .. }) = handshake::parse_line(&line) {
                send_hello(io, &hello)
                    .await
                    .map_err(|e| ChannelError::io("sending HELLO to the agent", e))?;
                resend.reset();
                continue;
            }
            if let Some(HandshakeLine::Ready {
                major,
                nonce: answered,
                agent_version,
            }) = handshake::parse_line(&line)
            {
                if answered != nonce {
                    continue; // an answer to an earlier host's HELLO
                }
                if major != PROTOCOL_MAJOR {
                    return Err(ChannelError::Incompatible {
                        major,
                        agent_version,
                    });
                }
                return Ok(Ready {
                    agent_version,
                    rest: lines.take_rest(),
                });
            }
        }
        tokio::select! {
            read = io.read(&mut chunk) => match read {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => lines.push(&chunk[..n]),
                Err(e) => return Err(ChannelError::io("reading the agent's READY", e)),
            },
            _ = resend.tick() => {
                send_hello(io, &hello).await.map_err(|e| ChannelError::io("sending HELLO to the agent", e))?;
            }
        }
    }
}

async fn send_hello<S: AsyncWrite + Unpin>(io: &mut S, hello: &str) -> io::Result<()> {
    io.write_all(hello.as_bytes()).await?;
    io.flush().await
}

fn random_nonce() -> Result<String, ChannelError> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(ChannelError::io(
            "generating a handshake nonce",
            io::Error::last_os_error(),
        ));
    }
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// Plays the guest: reads HELLO lines from `guest` and answers with `answer(nonce)`.
    async fn read_nonce<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> String {
        let mut line = String::new();
        while line.trim().is_empty() {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
        }
        let rest = line
            .trim_end()
            .strip_prefix("HEARTH-AGENT/1 HELLO ")
            .expect("a HELLO line");
        rest.to_string()
    }

    #[tokio::test]
    async fn skips_stale_bytes_and_other_nonces_before_ready() {
        let (mut host, guest) = tokio::io::duplex(64 * 1024);
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let guest_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(guest_read);
            let nonce = read_nonce(&mut reader).await;
            let mut stale = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00GOAWAY-ish binary".to_vec();
            stale.extend_from_slice(&vec![0xEE; 2000]);
            stale.extend_from_slice(b"\nHEARTH-AGENT/1 READY 0123 0.0.1\n");
            stale.extend_from_slice(
                format!("HEARTH-AGENT/1 READY {nonce} 9.9.9\nH2DATA").as_bytes(),
            );
            guest_write.write_all(&stale).await.unwrap();
            reader
        });
        let ready = hello(&mut host).await.unwrap();
        assert_eq!(ready.agent_version, "9.9.9");
        assert_eq!(ready.rest, b"H2DATA");
        guest_task.await.unwrap();
    }

    #[tokio::test]
    async fn repeats_hello_until_the_guest_answers() {
        let (mut host, guest) = tokio::io::duplex(64 * 1024);
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let guest_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(guest_read);
            // A booting guest: ignore the first two HELLOs.
            let first = read_nonce(&mut reader).await;
            assert_eq!(read_nonce(&mut reader).await, first);
            assert_eq!(read_nonce(&mut reader).await, first);
            guest_write
                .write_all(format!("HEARTH-AGENT/1 READY {first} 1.0.0\n").as_bytes())
                .await
                .unwrap();
            reader
        });
        let started = std::time::Instant::now();
        let ready = hello(&mut host).await.unwrap();
        assert!(ready.rest.is_empty());
        assert!(
            started.elapsed() >= HELLO_INTERVAL * 2,
            "answered only after two repeats"
        );
        guest_task.await.unwrap();
    }

    #[tokio::test]
    async fn waiting_guest_gets_a_hello_at_once() {
        let (mut host, guest) = tokio::io::duplex(64 * 1024);
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let guest_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(guest_read);
            let first = read_nonce(&mut reader).await; // sent on connect, before the guest listens
            let asked = std::time::Instant::now();
            guest_write
                .write_all(b"\nHEARTH-AGENT/1 WAITING\n")
                .await
                .unwrap();
            assert_eq!(read_nonce(&mut reader).await, first);
            assert!(
                asked.elapsed() < HELLO_INTERVAL / 2,
                "HELLO came at once, not at the retry"
            );
            guest_write
                .write_all(format!("HEARTH-AGENT/1 READY {first} 1.0.0\n").as_bytes())
                .await
                .unwrap();
            reader
        });
        hello(&mut host).await.unwrap();
        guest_task.await.unwrap();
    }

    #[tokio::test]
    async fn a_resume_line_goes_before_every_hello() {
        let (mut host, guest) = tokio::io::duplex(64 * 1024);
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let resume = Resume {
            unix_time_ns: 1_700_000_000_123_456_789,
            seed: [7; handshake::RESUME_SEED_LEN],
            hostname: "hearth-abc".into(),
        };
        let expected = resume.clone();
        let guest_task = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(guest_read);
            // A restored guest's fresh session announces itself; RESUME + HELLO follow at once.
            let asked = std::time::Instant::now();
            guest_write
                .write_all(handshake::waiting_line().as_bytes())
                .await
                .unwrap();
            let mut resumes = 0;
            let mut hellos = Vec::new();
            let mut line = String::new();
            while hellos.len() < 2 {
                line.clear();
                reader.read_line(&mut line).await.unwrap();
                match handshake::parse_line(line.trim_end().as_bytes()) {
                    Some(HandshakeLine::Resume(r)) => {
                        assert_eq!(r, expected);
                        if resumes == 0 {
                            assert!(asked.elapsed() < HELLO_INTERVAL / 2, "sent on WAITING");
                        }
                        assert_eq!(resumes, hellos.len(), "RESUME precedes its HELLO");
                        resumes += 1;
                    }
                    Some(HandshakeLine::Hello { nonce, .. }) => hellos.push(nonce),
                    _ => {}
                }
            }
            guest_write
                .write_all(format!("HEARTH-AGENT/1 READY {} 1.0.0\n", hellos[0]).as_bytes())
                .await
                .unwrap();
            reader
        });
        hello_resuming(&mut host, Some(&resume)).await.unwrap();
        guest_task.await.unwrap();
    }

    #[tokio::test]
    async fn a_hostname_the_guest_would_reject_is_refused_before_sending() {
        let (mut host, _guest) = tokio::io::duplex(1024);
        let resume = Resume {
            unix_time_ns: 1,
            seed: [0; handshake::RESUME_SEED_LEN],
            hostname: "bad name".into(),
        };
        let err = hello_resuming(&mut host, Some(&resume)).await.unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
    }

    #[tokio::test]
    async fn another_major_version_is_a_clear_error() {
        let (mut host, guest) = tokio::io::duplex(64 * 1024);
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(guest_read);
            let nonce = read_nonce(&mut reader).await;
            guest_write
                .write_all(format!("HEARTH-AGENT/2 READY {nonce} 2.0.0\n").as_bytes())
                .await
                .unwrap();
            reader
        });
        let err = hello(&mut host).await.unwrap_err();
        assert!(
            matches!(err, ChannelError::Incompatible { major: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("2.0.0"), "{err}");
    }

    #[tokio::test]
    async fn closed_stream_is_reported() {
        let (mut host, guest) = tokio::io::duplex(1024);
        drop(guest);
        assert!(matches!(
            hello(&mut host).await,
            Err(ChannelError::Closed) | Err(ChannelError::Io { .. })
        ));
    }
}
