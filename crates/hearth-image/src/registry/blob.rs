//! Layer blob downloads: streamed into a `BlobWriter`, resumed with `Range` after resets, stalls and
//! early ends (or skipping the resent prefix when a server ignores `Range`), verified on commit.
//! Network only; bytes go to the writer.

use futures::StreamExt;
use reqwest::header::CONTENT_RANGE;
use reqwest::{Method, StatusCode};

use super::client::{error_chain, with_attempts, Attempt, RegistryClient};
use super::RegistryError;
use crate::store::BlobWriter;

impl RegistryClient {
    /// Streams blob `writer.digest()` of `size` bytes into `writer`, resuming after failures, then
    /// commits (verifies) it. `on_bytes` is called with each chunk's length, for progress.
    pub async fn blob_into(
        &self,
        mut writer: BlobWriter,
        size: u64,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<(), RegistryError> {
        let url = format!("{}/blobs/{}", self.base, writer.digest());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let offset = writer.written();
            let failure = match self.blob_attempt(&url, &mut writer, offset, on_bytes).await {
                Ok(()) if writer.written() == size => break,
                Ok(()) => RegistryError::Truncated {
                    url: url.clone(),
                    got: writer.written(),
                    expected: size,
                    attempts: attempt,
                },
                Err(Attempt::Fatal(e)) => {
                    writer.abandon(e.to_string());
                    return Err(e);
                }
                Err(Attempt::Retry(e)) => e,
            };
            if attempt >= self.policy.attempts {
                let failure = with_attempts(failure, attempt);
                writer.abandon(failure.to_string());
                return Err(failure);
            }
            tracing::debug!(%url, attempt, error = %failure, "blob download failed; retrying");
            tokio::time::sleep(self.policy.delay(attempt)).await;
        }
        writer.commit()?;
        Ok(())
    }

    async fn blob_attempt(
        &self,
        url: &str,
        writer: &mut BlobWriter,
        offset: u64,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<(), Attempt> {
        let range = (offset > 0).then(|| format!("bytes={offset}-"));
        let resp = self
            .send_once_authed(Method::GET, url, None, range.as_deref())
            .await?;
        let status = resp.status();
        // A server that ignores Range resends from the start: skip what we already have.
        let mut skip = match status {
            StatusCode::PARTIAL_CONTENT => {
                let starts_at_offset = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&format!("bytes {offset}-")));
                if !starts_at_offset {
                    return Err(Attempt::Retry(RegistryError::Status {
                        url: url.into(),
                        status: 206,
                        attempts: 1,
                        body: "unexpected Content-Range".into(),
                    }));
                }
                0
            }
            StatusCode::OK => offset,
            _ => return Err(self.status_error(resp, url, "blob", 1).await),
        };
        let mut stream = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(self.policy.stall_timeout, stream.next()).await;
            let chunk = match next {
                Err(_) => {
                    return Err(Attempt::Retry(RegistryError::Stalled {
                        url: url.into(),
                        secs: self.policy.stall_timeout.as_secs(),
                        attempts: 1,
                    }))
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    return Err(Attempt::Retry(RegistryError::Broken {
                        url: url.into(),
                        attempts: 1,
                        detail: error_chain(&e),
                    }))
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let mut data = &chunk[..];
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                data = &data[n..];
                skip -= n as u64;
            }
            if !data.is_empty() {
                writer.write(data).map_err(|e| Attempt::Fatal(e.into()))?;
                on_bytes(data.len() as u64);
            }
        }
    }
}
