//! Host side of file transfer: [`AgentClient::put_file`] streams a reader into a file in the guest;
//! [`AgentClient::get_file`] returns a [`FileDownload`] that streams the file out. Both move one
//! window of data at a time, so file size does not grow memory.

use bytes::Bytes;
use h2::RecvStream;
use hearth_proto::files::{MODE_HEADER, SIZE_HEADER};
use hearth_proto::{AgentRequest, FileStat};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{closed_or, read_json, send_all, AgentClient, ChannelError};

const CHUNK: usize = 64 * 1024;

impl AgentClient {
    /// Writes everything `data` yields to `path` in the workload root (owned by root), replacing
    /// any file there once complete. Returns the new file's stat.
    pub async fn put_file<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: u32,
        data: R,
    ) -> Result<FileStat, ChannelError> {
        self.put_file_owned(path, mode, 0, 0, data).await
    }

    /// [`AgentClient::put_file`] with an owner.
    pub async fn put_file_owned<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        mut data: R,
    ) -> Result<FileStat, ChannelError> {
        let request = AgentRequest::PutFile {
            path: path.into(),
            mode,
            uid,
            gid,
        };
        let (response, mut send) = self.start(&request, false).await?;
        let upload = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = data.read(&mut buf).await.map_err(|e| {
                    ChannelError::io(format!("reading the data to put at {path}"), e)
                })?;
                if n == 0 {
                    return send_all(&mut send, Bytes::new(), true).await;
                }
                send_all(&mut send, Bytes::copy_from_slice(&buf[..n]), false).await?;
            }
        };
        // The agent may refuse before reading the body (missing directory): its answer then
        // explains the failure better than the interrupted upload does.
        let (uploaded, answer) = tokio::join!(upload, super::read_response(response));
        let body = answer?;
        uploaded?;
        read_json(body).await
    }

    /// Opens `path` in the workload root for reading.
    pub async fn get_file(&self, path: &str) -> Result<FileDownload, ChannelError> {
        let (response, _) = self
            .start(&AgentRequest::GetFile { path: path.into() }, true)
            .await?;
        let response = response.await.map_err(closed_or)?;
        let header = |name: &str, radix: u32| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| u64::from_str_radix(v, radix).ok())
        };
        let (mode, size) = (header(MODE_HEADER, 8), header(SIZE_HEADER, 10));
        let status = response.status();
        let body = response.into_body();
        if status != http::StatusCode::OK {
            // Re-dispatch through the common error path.
            return Err(super::error_from_body(status, body).await);
        }
        Ok(FileDownload {
            mode: mode.unwrap_or(0) as u32,
            size: size.unwrap_or(0),
            body,
            unreleased: 0,
        })
    }
}

/// A file being read from the guest.
pub struct FileDownload {
    mode: u32,
    size: u64,
    body: RecvStream,
    unreleased: usize,
}

impl FileDownload {
    /// Permission bits of the file.
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// Size of the file when the agent opened it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk, `None` at the end. Window for a chunk is released when the next is asked for.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ChannelError> {
        if self.unreleased > 0 {
            let _ = self.body.flow_control().release_capacity(self.unreleased);
            self.unreleased = 0;
        }
        match self.body.data().await {
            Some(Ok(chunk)) => {
                self.unreleased = chunk.len();
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(closed_or(e)),
            None => Ok(None),
        }
    }

    /// Writes the whole file to `out`; returns the bytes copied.
    pub async fn copy_to<W: AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
    ) -> Result<u64, ChannelError> {
        let mut copied = 0;
        while let Some(chunk) = self.chunk().await? {
            out.write_all(&chunk)
                .await
                .map_err(|e| ChannelError::io("writing a downloaded file", e))?;
            copied += chunk.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| ChannelError::io("writing a downloaded file", e))?;
        Ok(copied)
    }

    /// The whole file in memory; fails if it is larger than `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>, ChannelError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(ChannelError::Protocol(format!(
                    "file larger than the {limit}-byte limit"
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}
