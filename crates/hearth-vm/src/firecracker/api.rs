//! A small HTTP/1.1 client for Firecracker's REST API on its Unix socket: one connection per
//! request, JSON bodies, `Content-Length` framing (Firecracker answers 204 without a body on
//! success and a JSON `{"fault_message": ...}` on error). Touches only the given socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::config::{ActionType, ApiRequest, RunState, VmConfig};

/// Configuration calls answer in microseconds; InstanceStart loads the kernel and may take longer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A full snapshot writes the whole guest memory: seconds per GiB on a slow disk.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on a response we are willing to buffer (Firecracker's are a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to the Firecracker API socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("{method} {path} on {socket}: {source}")]
    Io {
        socket: PathBuf,
        method: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{method} {path}: malformed response from Firecracker: {detail}")]
    BadResponse {
        method: &'static str,
        path: String,
        detail: String,
    },
    #[error("Firecracker rejected {method} {path} with HTTP {status}: {fault}")]
    Rejected {
        method: &'static str,
        path: String,
        status: u16,
        fault: String,
    },
}

impl ApiError {
    /// The call's read or write timed out: Firecracker did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ApiError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock))
    }
}

/// `GET /` (Firecracker's `InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// A status code and the parsed JSON body, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
}

impl FirecrackerApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        FirecrackerApi {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and fails unless Firecracker answers 2xx.
    pub fn call(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        self.call_within(request, IO_TIMEOUT)
    }

    /// [`FirecrackerApi::call`] waiting up to `timeout` for each read and write.
    fn call_within(
        &self,
        request: &ApiRequest,
        timeout: Duration,
    ) -> Result<ApiResponse, ApiError> {
        let response = self.send_within(request, timeout)?;
        if !(200..300).contains(&response.status) {
            let fault = response
                .body
                .as_ref()
                .and_then(|b| b.get("fault_message"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{:?}", response.body));
            return Err(ApiError::Rejected {
                method: request.method,
                path: request.path.clone(),
                status: response.status,
                fault,
            });
        }
        Ok(response)
    }

    /// Applies every configuration call of `config`, stopping at the first rejection.
    pub fn configure(&self, config: &VmConfig) -> Result<(), ApiError> {
        self.call_all(&config.requests())
    }

    /// Applies `requests` in order, stopping at the first rejection.
    pub fn call_all(&self, requests: &[ApiRequest]) -> Result<(), ApiError> {
        requests
            .iter()
            .try_for_each(|request| self.call(request).map(drop))
    }

    /// Writes a full snapshot of the paused VM (paths as Firecracker sees them).
    pub fn snapshot_create(
        &self,
        snapshot_path: &str,
        mem_file_path: &str,
    ) -> Result<(), ApiError> {
        let request = ApiRequest::snapshot_create(snapshot_path, mem_file_path);
        self.call_within(&request, SNAPSHOT_TIMEOUT).map(drop)
    }

    pub fn instance_start(&self) -> Result<(), ApiError> {
        self.call(&ApiRequest::action(ActionType::InstanceStart))
            .map(drop)
    }

    /// Presses Ctrl+Alt+Del on the guest's i8042 keyboard: an orderly guest shutdown request.
    pub fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.call(&ApiRequest::action(ActionType::SendCtrlAltDel))
            .map(drop)
    }

    pub fn set_state(&self, state: RunState) -> Result<(), ApiError> {
        self.call(&ApiRequest::vm_state(state)).map(drop)
    }

    pub fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        let request = ApiRequest::get("/");
        let response = self.call(&request)?;
        let body = response.body.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(body).map_err(|e| ApiError::BadResponse {
            method: request.method,
            path: request.path,
            detail: format!("not an InstanceInfo: {e}"),
        })
    }

    /// One request/response exchange, any status.
    pub fn send(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        self.send_within(request, IO_TIMEOUT)
    }

    fn send_within(
        &self,
        request: &ApiRequest,
        timeout: Duration,
    ) -> Result<ApiResponse, ApiError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| ApiError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        let io_error = |source| ApiError::Io {
            socket: self.socket.clone(),
            method: request.method,
            path: request.path.clone(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
        (&stream).write_all(&encode(request)).map_err(io_error)?;
        read_response(BufReader::new(&stream)).map_err(|e| match e {
            ReadError::Io(source) => io_error(source),
            ReadError::Malformed(detail) => ApiError::BadResponse {
                method: request.method,
                path: request.path.clone(),
                detail,
            },
        })
    }
}

/// The request's bytes on the wire.
pub(crate) fn encode(request: &ApiRequest) -> Vec<u8> {
    let body = request
        .body
        .as_ref()
        .map(|b| serde_json::to_vec(b).expect("JSON values serialize"))
        .unwrap_or_default();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
        request.method, request.path
    );
    if request.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend(body);
    bytes
}

enum ReadError {
    Io(std::io::Error),
    Malformed(String),
}

fn read_response(mut reader: impl BufRead) -> Result<ApiResponse, ReadError> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(ReadError::Io)?;
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ReadError::Malformed(format!("status line {line:?}")))?;
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ReadError::Io)? == 0 {
            return Err(ReadError::Malformed(
                "connection closed inside the headers".into(),
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| ReadError::Malformed(format!("Content-Length {value:?}")))?;
            }
        }
    }
    if length > MAX_RESPONSE {
        return Err(ReadError::Malformed(format!("{length}-byte body")));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(ReadError::Io)?;
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice(&body)
                .map_err(|e| ReadError::Malformed(format!("body is not JSON: {e}")))?,
        )
    };
    Ok(ApiResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Firecracker that takes the call and never answers (a frozen one) is a timeout, which is
    /// how a pause or snapshot of a frozen VM is told from Firecracker refusing it; one that
    /// answers is not.
    #[test]
    fn a_call_nobody_answers_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let api = FirecrackerApi::new(&socket);
        let pause = ApiRequest::patch("/vm", &serde_json::json!({"state": "Paused"}));
        let e = api
            .send_within(&pause, Duration::from_millis(200))
            .unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        drop(held.join().unwrap());
        let refused = ApiError::Rejected {
            method: "PATCH",
            path: "/vm".into(),
            status: 400,
            fault: "no".into(),
        };
        assert!(!refused.is_timeout());
    }

    #[test]
    fn encodes_a_put_with_length_and_json_body() {
        let request = ApiRequest::action(ActionType::InstanceStart);
        let wire = String::from_utf8(encode(&request)).unwrap();
        let body = r#"{"action_type":"InstanceStart"}"#;
        assert!(wire.starts_with("PUT /actions HTTP/1.1\r\n"), "{wire}");
        assert!(wire.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(wire.ends_with(&format!("\r\n\r\n{body}")), "{wire}");
    }

    #[test]
    fn parses_no_content_and_error_responses() {
        let ok = read_response(&b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n"[..]);
        assert_eq!(
            ok.ok().unwrap(),
            ApiResponse {
                status: 204,
                body: None
            }
        );
        let fault = br#"{"fault_message":"The requested operation is not supported before starting the microVM."}"#;
        let mut raw = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            fault.len()
        )
        .into_bytes();
        raw.extend_from_slice(fault);
        let bad = read_response(&raw[..]).ok().unwrap();
        assert_eq!(bad.status, 400);
        assert!(bad.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("not supported"));
        assert!(read_response(&b"garbage\r\n\r\n"[..]).is_err());
    }
}
