//! Bounded reads of non-blob registry answers (manifests, configs, token answers, error bodies)
//! and the short, printable form of registry-controlled text that may reach a tenant. Nothing a
//! registry sends is read whole or echoed at length.

use futures::StreamExt;
use reqwest::Response;

use super::client::error_chain;
use super::RegistryError;
pub use crate::untrusted::sanitize;

/// The most read from a token answer or an error body.
pub(super) const MAX_SMALL_BODY: usize = 64 << 10;

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
