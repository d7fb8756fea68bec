//! The agent's requests as one enum: a variant per HTTP route. The host builds the method and URI
//! from a variant; the agent parses them back into one, so both ends share a single definition of
//! the routes.

use crate::error::AgentError;
use crate::exec::TtySize;

/// Default permission bits of a file written by `PUT /v1/files` without `mode`.
pub const DEFAULT_FILE_MODE: u32 = 0o644;

/// One request to the agent. Paths are absolute paths inside the workload root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRequest {
    /// `POST /v1/exec`: body and response are frame streams (see the protocol document).
    Exec,
    /// `POST /v1/attach?exec=ID`: takes over a running exec started `attachable` (see
    /// [`crate::ExecRequest::attachable`]): the body carries its stdin as `Stdin` frames, the
    /// response is its output stream again (`Started`, output, `Exit`).
    Attach { exec: u64 },
    /// `GET /v1/execs`: answers [`crate::ExecList`], the running execs.
    Execs,
    /// `POST /v1/signal?exec=ID&signal=N`: sends signal N to a running exec.
    Signal { exec: u64, signal: i32 },
    /// `POST /v1/resize?exec=ID&rows=R&cols=C`: sets the terminal size of a running exec started
    /// with a `tty` (the kernel then sends its foreground process group SIGWINCH).
    Resize { exec: u64, size: TtySize },
    /// `PUT /v1/files?path=P&mode=OCTAL[&uid=U&gid=G]`: body = the file's bytes; replaces the file
    /// atomically once the whole body arrived. Answers the new file's [`crate::FileStat`].
    PutFile {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// `GET /v1/files?path=P`: body = the file's bytes.
    GetFile { path: String },
    /// `GET /v1/stat?path=P`: answers [`crate::FileStat`] (symlinks not followed).
    Stat { path: String },
    /// `GET /v1/list?path=P`: answers [`crate::DirListing`].
    List { path: String },
    /// `GET /v1/info`: answers [`crate::AgentInfo`].
    Info,
    /// `POST /v1/forward?port=N`: relays a TCP connection to `127.0.0.1:N` in the guest over the
    /// stream (see [`crate::ports`]).
    Forward { port: u16 },
    /// `POST /v1/shutdown`: kills every exec, syncs and unmounts, answers, then reboots the guest
    /// (the VM's clean exit).
    Shutdown,
}

impl AgentRequest {
    pub fn method(&self) -> &'static str {
        match self {
            AgentRequest::Exec
            | AgentRequest::Attach { .. }
            | AgentRequest::Signal { .. }
            | AgentRequest::Resize { .. }
            | AgentRequest::Shutdown
            | AgentRequest::Forward { .. } => "POST",
            AgentRequest::PutFile { .. } => "PUT",
            AgentRequest::GetFile { .. }
            | AgentRequest::Stat { .. }
            | AgentRequest::List { .. }
            | AgentRequest::Execs
            | AgentRequest::Info => "GET",
        }
    }

    /// Path plus query string, e.g. `/v1/stat?path=%2Fetc%2Fhosts`.
    pub fn path_and_query(&self) -> String {
        match self {
            AgentRequest::Exec => "/v1/exec".into(),
            AgentRequest::Attach { exec } => format!("/v1/attach?exec={exec}"),
            AgentRequest::Execs => "/v1/execs".into(),
            AgentRequest::Signal { exec, signal } => {
                format!("/v1/signal?exec={exec}&signal={signal}")
            }
            AgentRequest::Resize { exec, size } => format!(
                "/v1/resize?exec={exec}&rows={}&cols={}",
                size.rows, size.cols
            ),
            AgentRequest::PutFile {
                path,
                mode,
                uid,
                gid,
            } => {
                format!(
                    "/v1/files?path={}&mode={mode:o}&uid={uid}&gid={gid}",
                    encode(path)
                )
            }
            AgentRequest::GetFile { path } => format!("/v1/files?path={}", encode(path)),
            AgentRequest::Stat { path } => format!("/v1/stat?path={}", encode(path)),
            AgentRequest::List { path } => format!("/v1/list?path={}", encode(path)),
            AgentRequest::Info => "/v1/info".into(),
            AgentRequest::Shutdown => "/v1/shutdown".into(),
            AgentRequest::Forward { port } => format!("/v1/forward?port={port}"),
        }
    }

    /// The request for a method and path-and-query, or an `InvalidRequest` error naming what is wrong.
    pub fn parse(method: &str, path_and_query: &str) -> Result<AgentRequest, AgentError> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let query = Query::parse(query)?;
        let request = match (method, path) {
            ("POST", "/v1/exec") => AgentRequest::Exec,
            ("POST", "/v1/attach") => AgentRequest::Attach {
                exec: query.number("exec", 10)?,
            },
            ("GET", "/v1/execs") => AgentRequest::Execs,
            ("POST", "/v1/signal") => AgentRequest::Signal {
                exec: query.number("exec", 10)?,
                signal: query.number("signal", 10)?,
            },
            ("POST", "/v1/resize") => AgentRequest::Resize {
                exec: query.number("exec", 10)?,
                size: TtySize {
                    rows: query.number("rows", 10)?,
                    cols: query.number("cols", 10)?,
                },
            },
            ("PUT", "/v1/files") => AgentRequest::PutFile {
                path: query.path()?,
                mode: query
                    .optional_number("mode", 8)?
                    .unwrap_or(DEFAULT_FILE_MODE),
                uid: query.optional_number("uid", 10)?.unwrap_or(0),
                gid: query.optional_number("gid", 10)?.unwrap_or(0),
            },
            ("GET", "/v1/files") => AgentRequest::GetFile {
                path: query.path()?,
            },
            ("GET", "/v1/stat") => AgentRequest::Stat {
                path: query.path()?,
            },
            ("GET", "/v1/list") => AgentRequest::List {
                path: query.path()?,
            },
            ("GET", "/v1/info") => AgentRequest::Info,
            ("POST", "/v1/shutdown") => AgentRequest::Shutdown,
            ("POST", "/v1/forward") => AgentRequest::Forward {
                port: query.number("port", 10)?,
            },
            _ => {
                return Err(AgentError::invalid(format!(
                    "no route for {method} {path} (agent protocol v{})",
                    crate::PROTOCOL_MAJOR
                )))
            }
        };
        if let AgentRequest::Forward { port } = request {
            if !crate::ports::valid_port(port) {
                return Err(AgentError::invalid("port 0 cannot be forwarded"));
            }
        }
        if let AgentRequest::PutFile { mode, .. } = request {
            if mode > 0o7777 {
                return Err(AgentError::invalid(format!(
                    "file mode {mode:o} is not a permission mode"
                )));
            }
        }
        Ok(request)
    }
}

/// Decoded query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Result<Query, AgentError> {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((decode(key)?, decode(value)?))
            })
            .collect::<Result<_, AgentError>>()?;
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn path(&self) -> Result<String, AgentError> {
        let path = self
            .get("path")
            .ok_or_else(|| AgentError::invalid("query parameter `path` is missing"))?;
        if !path.starts_with('/') {
            return Err(AgentError::invalid(format!(
                "path {path:?} is not absolute"
            )));
        }
        Ok(path.to_string())
    }

    fn optional_number<T: TryFrom<i64>>(
        &self,
        key: &str,
        radix: u32,
    ) -> Result<Option<T>, AgentError> {
        let Some(text) = self.get(key) else {
            return Ok(None);
        };
        i64::from_str_radix(text, radix)
            .ok()
            .and_then(|n| T::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                AgentError::invalid(format!(
                    "query parameter `{key}`={text:?} is not a valid number"
                ))
            })
    }

    fn number<T: TryFrom<i64>>(&self, key: &str, radix: u32) -> Result<T, AgentError> {
        self.optional_number(key, radix)?
            .ok_or_else(|| AgentError::invalid(format!("query parameter `{key}` is missing")))
    }
}

/// Percent-encodes everything except unreserved characters and `/`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> Result<String, AgentError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    AgentError::invalid(format!("bad percent-escape in query {text:?}"))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| AgentError::invalid(format!("query {text:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_round_trips_through_method_and_uri() {
        let requests = [
            AgentRequest::Exec,
            AgentRequest::Signal {
                exec: 7,
                signal: 15,
            },
            AgentRequest::Resize {
                exec: 3,
                size: TtySize {
                    rows: 50,
                    cols: 132,
                },
            },
            AgentRequest::PutFile {
                path: "/tmp/a b&c=d%e/ü".into(),
                mode: 0o4755,
                uid: 1000,
                gid: 100,
            },
            AgentRequest::GetFile {
                path: "/etc/hosts".into(),
            },
            AgentRequest::Stat { path: "/".into() },
            AgentRequest::List {
                path: "/usr/bin".into(),
            },
            AgentRequest::Info,
            AgentRequest::Shutdown,
            AgentRequest::Forward { port: 8000 },
            AgentRequest::Attach { exec: 12 },
            AgentRequest::Execs,
        ];
        for request in requests {
            let uri = request.path_and_query();
            assert_eq!(
                AgentRequest::parse(request.method(), &uri).unwrap(),
                request,
                "{uri}"
            );
        }
    }

    #[test]
    fn put_file_defaults_mode_and_owner() {
        let request = AgentRequest::parse("PUT", "/v1/files?path=/x").unwrap();
        assert_eq!(
            request,
            AgentRequest::PutFile {
                path: "/x".into(),
                mode: 0o644,
                uid: 0,
                gid: 0
            }
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        for (method, uri, needle) in [
            ("GET", "/v1/exec", "no route"),
            ("GET", "/v2/info", "no route"),
            ("GET", "/v1/stat", "`path` is missing"),
            ("GET", "/v1/stat?path=relative", "not absolute"),
            ("GET", "/v1/stat?path=%zz", "percent-escape"),
            ("GET", "/v1/stat?path=%ff", "not UTF-8"),
            ("POST", "/v1/signal?exec=1", "`signal` is missing"),
            ("POST", "/v1/signal?exec=x&signal=1", "not a valid number"),
            ("POST", "/v1/resize?exec=1&rows=24", "`cols` is missing"),
            (
                "POST",
                "/v1/resize?exec=1&rows=24&cols=70000",
                "not a valid number",
            ),
            ("PUT", "/v1/files?path=/x&mode=999", "not a valid number"),
            (
                "PUT",
                "/v1/files?path=/x&mode=17777",
                "not a permission mode",
            ),
            ("PUT", "/v1/files?path=/x&uid=-1", "not a valid number"),
            ("POST", "/v1/forward", "`port` is missing"),
            ("POST", "/v1/forward?port=0", "port 0"),
            ("POST", "/v1/forward?port=65536", "not a valid number"),
            ("GET", "/v1/forward?port=80", "no route"),
        ] {
            let err = AgentRequest::parse(method, uri).unwrap_err();
            assert_eq!(err.kind, crate::ErrorKind::InvalidRequest);
            assert!(err.message.contains(needle), "{uri}: {}", err.message);
        }
    }
}
