//! Bounded reads of non-blob registry answers (manifests, configs, token answers, error bodies)
//! and the short, printable form of registry-controlled text that may reach a tenant. Nothing a
//! registry sends is read whole or echoed at length.

use futures::StreamExt;
use reqwest::Response;

use super::client::error_chain;
use super::RegistryError;

/// The most read from a token answer or an error body.
pub(super) const MAX_SMALL_BODY: usize = 64 << 10;

/// The most registry-controlled text put into an error message.
const MAX_REASON_CHARS: usize = 200;

/// Reads at most `limit` bytes of `resp`'s body. Returns the bytes and whether the body was longer
/// (the rest is never read). A body that stalls for `stall` fails.
pub(super) async fn read_capped(
    resp: Response,
    url: &str,
    limit: usize,
    stall: std::time::Duration,
) -> Result<(Vec<u8>, bool), RegistryError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Ok((Vec::new(), true));
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    loop {
        let chunk = match tokio::time::timeout(stall, stream.next()).await {
            Err(_) => {
                return Err(RegistryError::Stalled {
                    url: url.into(),
                    secs: stall.as_secs(),
                    attempts: 1,
                })
            }
            Ok(None) => return Ok((body, false)),
            Ok(Some(c)) => c.map_err(|e| RegistryError::Broken {
                url: url.into(),
                attempts: 1,
                detail: error_chain(&e),
            })?,
        };
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
}

/// Registry-controlled bytes as a short reason: printable ASCII only (anything else becomes `?`),
/// whitespace runs collapsed, at most 200 characters (then `...`).
pub fn sanitize(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut last_space = true;
    for &b in bytes {
        if out.len() >= MAX_REASON_CHARS {
            out.push_str("...");
            break;
        }
        let c = match b {
            b' ' | b'\t' | b'\r' | b'\n' => ' ',
            0x21..=0x7e => b as char,
            _ => '?',
        };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        out.push(c);
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_it_short_and_printable() {
        assert_eq!(sanitize(b"  not\n\n found\x1b[31m\xff "), "not found?[31m?");
        let long = sanitize(&[b'a'; 100_000]);
        assert_eq!(long.len(), MAX_REASON_CHARS + 3);
        assert!(long.ends_with("..."));
    }
}
