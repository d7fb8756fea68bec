//! Host side of file transfer: [`AgentClient::put_file`] streams a reader into a file in the guest;
//! [`AgentClient::get_file`] returns a [`FileDownload`] that streams the file out. Both move one
//! window of data at a time, so file size does not grow memory. The agent gets
//! [`ANSWER_DEADLINE`] for each wait on it: a download's answer head, each window an upload waits
//! for, and an upload's answer once its data is sent. The transfers themselves take as long as the
//! data needs.

use bytes::Bytes;
use h2::RecvStream;
use hearth_proto::files::{MODE_HEADER, SIZE_HEADER};
use hearth_proto::{AgentRequest, FileStat};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{bounded, closed_or, read_json, send_all, AgentClient, ChannelError, ANSWER_DEADLINE};

const CHUNK: usize = 64 * 1024;
/// How long an upload that failed waits for the agent's answer (which explains a refusal better).
const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

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
        let (response, mut send, _permit) = bounded(
            "a file upload",
            ANSWER_DEADLINE,
            self.start(&request, false),
        )
        .await?;
        // Sent on when all data is sent (the agent then has the deadline to answer), dropped when
        // the upload failed (the answer, if the agent refused early, is then due at once).
        let (uploaded_tx, uploaded_rx) = tokio::sync::oneshot::channel::<()>();
        let upload = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = data.read(&mut buf).await.map_err(|e| {
                    ChannelError::io(format!("reading the data to put at {path}"), e)
                })?;
                let piece = Bytes::copy_from_slice(&buf[..n]);
                // An agent that stops granting window is as hung as one that does not answer.
                let sent = send_all(&mut send, piece, n == 0);
                bounded("a file upload's data", ANSWER_DEADLINE, sent).await?;
                if n == 0 {
                    let _ = uploaded_tx.send(());
                    return Ok::<(), ChannelError>(());
                }
            }
        };
        let answer = async {
            let head = super::read_response(response);
            tokio::pin!(head);
            tokio::select! {
                head = &mut head => head,
                sent = uploaded_rx => {
                    let grace = if sent.is_ok() { ANSWER_DEADLINE } else { REFUSAL_GRACE };
                    bounded("a file upload", grace, head).await
                }
            }
        };
        // The agent may refuse before reading the body (missing directory): its answer then
        // explains the failure better than the interrupted upload does.
        let body = match tokio::join!(upload, answer) {
            (Err(upload), Err(ChannelError::Unresponsive { .. })) => return Err(upload),
            (_, Err(answer)) => return Err(answer),
            (uploaded, Ok(body)) => {
                uploaded?;
                body
            }
        };
        let stat = read_json(body, super::MAX_JSON_BODY);
        bounded("a file upload", ANSWER_DEADLINE, stat).await
    }

    /// Opens `path` in the workload root for reading.
    pub async fn get_file(&self, path: &str) -> Result<FileDownload, ChannelError> {
        let head = async {
            let (response, _, permit) = self
                .start(&AgentRequest::GetFile { path: path.into() }, true)
                .await?;
            Ok((response.await.map_err(closed_or)?, permit))
        };
        let (response, permit) = bounded("a file download", ANSWER_DEADLINE, head).await?;
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
            _permit: permit,
        })
    }
}

/// A file being read from the guest.
pub struct FileDownload {
    mode: u32,
    size: u64,
    body: RecvStream,
    unreleased: usize,
    /// Counts this download against [`super::MAX_CONCURRENT_REQUESTS`].
    _permit: tokio::sync::OwnedSemaphorePermit,
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
