//! A named fake of Firecracker's API server for a binary this machine cannot run: a Unix-socket
//! HTTP/1.1 peer that records each request (method, path, JSON body) and answers like Firecracker
//! (204 on success, `InstanceInfo` on `GET /`, `{"fault_message"}` with 400 on a rejected path).
//! Its requests are validated against Firecracker's schema by the tests that use it, and its own
//! `InstanceInfo` answer is checked against the schema's definition, so it cannot drift unnoticed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
}

impl Recorded {
    pub fn is_action(&self, action: &str) -> bool {
        self.path == "/actions"
            && self
                .body
                .as_ref()
                .is_some_and(|b| b["action_type"] == action)
    }
}

/// What the fake remembers between requests.
#[derive(Debug, Default)]
pub struct FakeState {
    pub id: String,
    pub started: bool,
    /// Requests to this path are rejected with 400.
    pub reject_path: Option<String>,
}

/// The `GET /` answer for a state.
pub fn instance_info(id: &str, started: bool) -> Value {
    let state = if started { "Running" } else { "Not started" };
    json!({"id": id, "state": state, "vmm_version": "1.17.0-dev", "app_name": "Firecracker"})
}

/// Reads one request from `stream`, answers it and returns it.
/// Serves one request. `before_reply` sees it before the response goes out, so whatever it records
/// is there by the time the client has its answer.
pub fn serve_one(
    stream: &UnixStream,
    state: &mut FakeState,
    before_reply: impl FnOnce(&Recorded),
) -> Recorded {
    let request = read_request(stream);
    before_reply(&request);
    let (status, body) = if state.reject_path.as_deref() == Some(request.path.as_str()) {
        (
            "400 Bad Request",
            Some(json!({"fault_message": "Invalid block device path"})),
        )
    } else if request.method == "GET" && request.path == "/" {
        ("200 OK", Some(instance_info(&state.id, state.started)))
    } else {
        if request.is_action("InstanceStart") {
            state.started = true;
        }
        ("204 No Content", None)
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status}\r\nServer: Firecracker API\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = (&*stream).write_all(response.as_bytes());
    request
}

/// Serves on `socket` from a thread until the test ends; returns the request log.
pub fn spawn_fake(socket: &Path, reject_path: Option<&str>) -> Arc<Mutex<Vec<Recorded>>> {
    let listener = UnixListener::bind(socket).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&log);
    let mut state = FakeState {
        id: "sb1".into(),
        reject_path: reject_path.map(str::to_owned),
        ..FakeState::default()
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            serve_one(&stream.unwrap(), &mut state, |request| {
                recorded.lock().unwrap().push(request.clone())
            });
        }
    });
    log
}

fn read_request(stream: &UnixStream) -> Recorded {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut words = line.split_whitespace();
    let (method, path) = (
        words.next().unwrap().to_owned(),
        words.next().unwrap().to_owned(),
    );
    assert_eq!(words.next(), Some("HTTP/1.1"), "request line {line:?}");
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let body = (length > 0).then(|| serde_json::from_slice(&body).unwrap());
    Recorded { method, path, body }
}
