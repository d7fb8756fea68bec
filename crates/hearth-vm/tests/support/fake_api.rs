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
    pub paused: bool,
    /// A boot resource (anything but the logger and metrics) was configured: a snapshot load is
    /// refused from then on, as Firecracker does.
    pub configured: bool,
    /// Requests to this path are rejected with 400.
    pub reject_path: Option<String>,
}

/// The `GET /` answer for a state.
pub fn instance_info(id: &str, started: bool) -> Value {
    let state = if started { "Running" } else { "Not started" };
    json!({"id": id, "state": state, "vmm_version": "1.17.0-dev", "app_name": "Firecracker"})
}

/// Firecracker's rules for the snapshot calls, and its effects (the fake writes the files a
/// snapshot names, so that the host can move them): `Err` is the fault message of a 400.
fn snapshot_call(state: &mut FakeState, request: &Recorded) -> Result<(), String> {
    let body = request.body.clone().unwrap_or_default();
    let text = |key: &str| body[key].as_str().unwrap_or_default().to_owned();
    match (request.method.as_str(), request.path.as_str()) {
        ("PUT", "/snapshot/create") => {
            if !state.started || !state.paused {
                return Err("Create snapshot error: the microVM must be paused".into());
            }
            std::fs::write(text("snapshot_path"), b"fake device state")
                .map_err(|e| e.to_string())?;
            std::fs::write(text("mem_file_path"), b"fake guest memory").map_err(|e| e.to_string())
        }
        ("PUT", "/snapshot/load") => {
            if state.started || state.configured {
                return Err(
                    "Loading a microVM snapshot not allowed after configuring boot-specific \
                            resources."
                        .into(),
                );
            }
            let memory = body["mem_backend"]["backend_path"]
                .as_str()
                .unwrap_or_default();
            for file in [text("snapshot_path"), memory.to_owned()] {
                if std::fs::read(&file).is_err() {
                    return Err(format!(
                        "Load snapshot error: cannot open {file}: No such file or directory"
                    ));
                }
            }
            state.started = true;
            state.paused = !body["resume_vm"].as_bool().unwrap_or(false);
            Ok(())
        }
        ("PATCH", path) if path.starts_with("/drives/") && !state.started => {
            Err("The requested operation is not supported before starting the microVM.".into())
        }
        ("PATCH", "/vm") => {
            state.paused = body["state"] == "Paused";
            Ok(())
        }
        ("PUT", "/logger" | "/metrics") => Ok(()),
        ("PUT", _) => {
            state.configured = true;
            Ok(())
        }
        _ => Ok(()),
    }
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
        let mut info = instance_info(&state.id, state.started);
        if state.started && state.paused {
            info["state"] = json!("Paused");
        }
        ("200 OK", Some(info))
    } else if let Err(fault) = snapshot_call(state, &request) {
        ("400 Bad Request", Some(json!({ "fault_message": fault })))
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
