//! A small client of `hearth serve`'s HTTP API, for `hearth sandbox ...`: one method per route,
//! the wire types of `crate::serve::api`, and error answers turned into messages that carry the
//! daemon's own explanation. Touches only the network.

use anyhow::{bail, Context};
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::serve::api::{
    CreateSandbox, ErrorBody, ExecBody, ExecEvent, FileWritten, Sandbox, SandboxList,
};
use crate::serve::code::{CodeResult, RunCode};
use crate::serve::processes::{
    Process, ProcessList, ProcessSignal, StartProcess, OFFSET_HEADER as OUTPUT_OFFSET,
};

/// An error answer of the daemon's: its status, its `code` (when the body is hearth's
/// `{"error", "code"}`) and the message shown.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    pub status: StatusCode,
    pub code: Option<String>,
    message: String,
}

impl DaemonError {
    /// Whether `error` means the daemon could not be reached or the connection to it broke, it
    /// is stopping, or a gateway cannot reach the sandbox's node: what a daemon restart looks
    /// like to a client.
    pub fn is_restart(error: &anyhow::Error) -> bool {
        error.chain().any(|e| {
            e.downcast_ref::<reqwest::Error>().is_some()
                || e.downcast_ref::<DaemonError>().is_some_and(|d| {
                    matches!(
                        d.code.as_deref(),
                        Some("shutting_down" | "node_unreachable")
                    )
                })
        })
    }
}

pub struct Client {
    http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    token: String,
}

impl Client {
    /// `host` is `http://HOST:PORT` or just `HOST:PORT`.
    pub fn new(host: &str, token: &str) -> anyhow::Result<Client> {
        let host = host.trim_end_matches('/');
        let base = match host.contains("://") {
            true => host.to_string(),
            false => format!("http://{host}"),
        };
        if token.is_empty() {
            bail!("no token: pass --token or set HEARTH_TOKEN to a token from the daemon's tokens file");
        }
        Ok(Client {
            http: reqwest::Client::new(),
            base,
            token: token.to_string(),
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send(&self, request: RequestBuilder, what: &str) -> anyhow::Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach the daemon at {}", self.base))?;
        check(response, what).await
    }

    pub async fn create(&self, body: &CreateSandbox) -> anyhow::Result<(StatusCode, Sandbox)> {
        let what = format!("creating a sandbox of {}", body.image);
        let response = self
            .send(
                self.request(Method::POST, "/v1/sandboxes").json(body),
                &what,
            )
            .await?;
        let status = response.status();
        Ok((
            status,
            response.json().await.context("reading the new sandbox")?,
        ))
    }

    /// `GET` (with `policy` None) or `PUT /v1/sandboxes/{id}/network`: the policy in force and
    /// the network's activity, as JSON.
    pub async fn network(
        &self,
        id: &str,
        policy: Option<&hearth_sandbox::NetworkPolicy>,
    ) -> anyhow::Result<serde_json::Value> {
        let path = format!("/v1/sandboxes/{id}/network");
        let (request, what) = match policy {
            Some(policy) => (
                self.request(Method::PUT, &path).json(policy),
                format!("setting the network policy of {id}"),
            ),
            None => (
                self.request(Method::GET, &path),
                format!("reading the network of {id}"),
            ),
        };
        let response = self.send(request, &what).await?;
        response.json().await.context("reading the network answer")
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Sandbox>> {
        let response = self
            .send(
                self.request(Method::GET, "/v1/sandboxes"),
                "listing sandboxes",
            )
            .await?;
        let list: SandboxList = response.json().await.context("reading the sandbox list")?;
        Ok(list.sandboxes)
    }

    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/v1/sandboxes/{id}");
        self.send(
            self.request(Method::DELETE, &path),
            &format!("removing sandbox {id}"),
        )
        .await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/pause` (with `force`: even while execs run); the record, `paused`.
    pub async fn pause(&self, id: &str, force: bool) -> anyhow::Result<Sandbox> {
        let path = format!("/v1/sandboxes/{id}/pause");
        let mut request = self.request(Method::POST, &path);
        if force {
            request = request.json(&serde_json::json!({ "force": true }));
        }
        let response = self.send(request, &format!("pausing sandbox {id}")).await?;
        response.json().await.context("reading the paused sandbox")
    }

    /// `POST /v1/sandboxes/{id}/resume`; the record, `running` again.
    pub async fn resume(&self, id: &str) -> anyhow::Result<Sandbox> {
        let path = format!("/v1/sandboxes/{id}/resume");
        let response = self
            .send(
                self.request(Method::POST, &path),
                &format!("resuming sandbox {id}"),
            )
            .await?;
        response.json().await.context("reading the resumed sandbox")
    }

    /// `POST /v1/sandboxes/{id}/fork`: `count` new sandboxes from the running one's state; their
    /// records, `running`.
    pub async fn fork(&self, id: &str, count: u32) -> anyhow::Result<Vec<Sandbox>> {
        let path = format!("/v1/sandboxes/{id}/fork");
        let request = self
            .request(Method::POST, &path)
            .json(&serde_json::json!({ "count": count }));
        let response = self.send(request, &format!("forking sandbox {id}")).await?;
        let list: SandboxList = response
            .json()
            .await
            .context("reading the forked sandboxes")?;
        Ok(list.sandboxes)
    }

    /// Starts a command; yields its events as the daemon streams them.
    pub async fn exec(
        &self,
        id: &str,
        body: &ExecBody,
    ) -> anyhow::Result<impl Stream<Item = anyhow::Result<ExecEvent>>> {
        let path = format!("/v1/sandboxes/{id}/exec");
        let what = format!("running {:?} in sandbox {id}", body.argv);
        let response = self
            .send(self.request(Method::POST, &path).json(body), &what)
            .await?;
        Ok(ndjson(Box::pin(response.bytes_stream())))
    }

    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        body: reqwest::Body,
    ) -> anyhow::Result<FileWritten> {
        let request = self
            .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path), ("mode", &format!("{mode:o}"))])
            .body(body);
        let response = self
            .send(request, &format!("copying to {id}:{path}"))
            .await?;
        Ok(response.json().await?)
    }

    /// A file's bytes (stream the response) or, for a directory, its JSON listing.
    pub async fn get_file(&self, id: &str, path: &str) -> anyhow::Result<Response> {
        let request = self
            .request(Method::GET, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path)]);
        self.send(request, &format!("copying from {id}:{path}"))
            .await
    }

    /// `POST /v1/sandboxes/{id}/code`: runs `code` in the sandbox's interpreter (one per sandbox,
    /// names kept between calls; calls on one sandbox wait their turn).
    pub async fn run_code(&self, id: &str, body: &RunCode) -> anyhow::Result<CodeResult> {
        let path = format!("/v1/sandboxes/{id}/code");
        let response = self
            .send(
                self.request(Method::POST, &path).json(body),
                &format!("running code in sandbox {id}"),
            )
            .await?;
        response.json().await.context("reading the code's result")
    }

    /// `DELETE /v1/sandboxes/{id}/code`: ends the sandbox's interpreter (the next run starts a
    /// fresh one).
    pub async fn reset_code(&self, id: &str) -> anyhow::Result<()> {
        let path = format!("/v1/sandboxes/{id}/code");
        self.send(
            self.request(Method::DELETE, &path),
            &format!("resetting the code interpreter of sandbox {id}"),
        )
        .await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/processes`: starts a background process.
    pub async fn start_process(&self, id: &str, body: &StartProcess) -> anyhow::Result<Process> {
        let path = format!("/v1/sandboxes/{id}/processes");
        let what = format!("starting {:?} in sandbox {id}", body.argv);
        let response = self
            .send(self.request(Method::POST, &path).json(body), &what)
            .await?;
        response.json().await.context("reading the started process")
    }

    /// `GET /v1/sandboxes/{id}/processes`.
    pub async fn processes(&self, id: &str) -> anyhow::Result<ProcessList> {
        let path = format!("/v1/sandboxes/{id}/processes");
        let what = format!("listing the processes of sandbox {id}");
        let response = self.send(self.request(Method::GET, &path), &what).await?;
        response.json().await.context("reading the process list")
    }

    /// `GET .../processes/{n}/output`: the offset where the answer starts (past `offset` when
    /// those bytes were dropped) and its kept output from there as exec events (with `follow`,
    /// until it ends).
    pub async fn process_output(
        &self,
        id: &str,
        n: u32,
        offset: u64,
        follow: bool,
    ) -> anyhow::Result<(u64, impl Stream<Item = anyhow::Result<ExecEvent>>)> {
        let path = format!("/v1/sandboxes/{id}/processes/{n}/output");
        let request = self.request(Method::GET, &path).query(&[
            ("offset", offset.to_string()),
            ("follow", follow.to_string()),
        ]);
        let what = format!("reading the output of process {n} of sandbox {id}");
        let response = self.send(request, &what).await?;
        let start = response
            .headers()
            .get(OUTPUT_OFFSET)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(offset);
        Ok((start, ndjson(Box::pin(response.bytes_stream()))))
    }

    /// `POST .../processes/{n}/signal`, or with `None`, `DELETE .../processes/{n}` (killed and
    /// forgotten).
    pub async fn signal_process(
        &self,
        id: &str,
        n: u32,
        signal: Option<i32>,
    ) -> anyhow::Result<()> {
        let path = format!("/v1/sandboxes/{id}/processes/{n}");
        let request = match signal {
            Some(signal) => self
                .request(Method::POST, &format!("{path}/signal"))
                .json(&ProcessSignal { signal }),
            None => self.request(Method::DELETE, &path),
        };
        let what = format!("signalling process {n} of sandbox {id}");
        self.send(request, &what).await?;
        Ok(())
    }

    /// `GET /openapi.json` (no token needed): which routes this daemon has.
    pub async fn openapi(&self) -> anyhow::Result<serde_json::Value> {
        let request = self.http.get(format!("{}/openapi.json", self.base));
        let response = self
            .send(request, "reading the daemon's /openapi.json")
            .await?;
        response
            .json()
            .await
            .context("reading the daemon's /openapi.json")
    }

    /// The WebSocket URL of a sandbox's interactive exec.
    pub fn exec_ws_url(&self, id: &str) -> String {
        let base = self
            .base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        format!("{base}/v1/sandboxes/{id}/exec/ws")
    }
}

/// An error answer as a message: the daemon's explanation and the status.
async fn check(response: Response, what: &str) -> anyhow::Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (
            Some(body.code.clone()),
            format!("{what}: {} ({status}, {})", body.error, body.code),
        ),
        Err(_) => (
            None,
            format!("{what}: the daemon answered {status}: {text}"),
        ),
    };
    Err(DaemonError {
        status,
        code,
        message,
    }
    .into())
}

/// Splits a byte stream into NDJSON events.
fn ndjson<S, E>(bytes: S) -> impl Stream<Item = anyhow::Result<ExecEvent>>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    futures::stream::unfold(
        (bytes, Vec::<u8>::new(), false),
        |(mut bytes, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let event = serde_json::from_slice::<ExecEvent>(&line)
                        .context("the daemon sent a line that is not an exec event");
                    return Some((event, (bytes, buf, false)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        let err = anyhow::Error::new(e).context("the exec stream broke");
                        return Some((Err(err), (bytes, buf, true)));
                    }
                    None if buf.is_empty() => return None,
                    None => {
                        let err = anyhow::anyhow!("the exec stream ended mid-line");
                        return Some((Err(err), (bytes, Vec::new(), true)));
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode, code: &str) -> anyhow::Error {
        anyhow::Error::new(DaemonError {
            status,
            code: Some(code.into()),
            message: code.into(),
        })
        .context("reading the output")
    }

    #[tokio::test]
    async fn only_what_a_daemon_restart_looks_like_counts_as_one() {
        assert!(DaemonError::is_restart(&answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down"
        )));
        assert!(DaemonError::is_restart(&answer(
            StatusCode::BAD_GATEWAY,
            "node_unreachable"
        )));
        for (status, code) in [
            (StatusCode::NOT_FOUND, "not_found"),
            (StatusCode::SERVICE_UNAVAILABLE, "capacity"),
        ] {
            assert!(!DaemonError::is_restart(&answer(status, code)), "{code}");
        }
        // Nothing listens: a connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(&format!("127.0.0.1:{port}"), "t").unwrap();
        let refused = client.process_output("s", 1, 0, true).await.err().unwrap();
        assert!(DaemonError::is_restart(&refused), "{refused:#}");
        assert!(!DaemonError::is_restart(&anyhow::anyhow!("a bad argument")));
    }
}
