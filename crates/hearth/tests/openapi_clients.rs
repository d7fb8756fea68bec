//! The checked-in OpenAPI document (`crates/hearth/openapi.json`) through the tools client authors
//! use: `openapi-spec-validator` must accept it, `openapi-python-client` must generate a client from
//! it without a warning, and that client, imported by Python, must talk to a real `hearth serve`
//! by the operationId-derived names (`get_health`, `list_sandboxes`, `get_sandbox`,
//! `put_sandbox_file`, ...), parse its answers into the documented models (errors as `ErrorBody`)
//! and never meet a status the document does not list: first without a VM (errors, health,
//! listing), then on one real busybox sandbox (create, upload, download, exec, delete). The Python
//! tools come from the suite's venv (`scripts/python-env.sh`, pinned in
//! `scripts/test-requirements.txt`). The document's own shape (unique operationIds, `format:
//! binary`, headers) is checked by the unit tests in `src/serve/openapi.rs`.

#[path = "serve/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use daemon::{image, Daemon, Home, ALICE};

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

/// Generator settings: a fixed package name, no formatter hooks (ruff is not part of the venv),
/// and the exec stream (`application/x-ndjson`, which no generator parses as one JSON value)
/// handed to the client as raw bytes.
const GENERATOR_CONFIG: &str = r#"{
  "package_name_override": "hearth_client",
  "post_hooks": [],
  "content_type_overrides": {"application/x-ndjson": "application/octet-stream"}
}"#;

/// Run by the generated client against the daemon (argv: URL, token). Every call goes through a
/// client with `raise_on_unexpected_status`, so an answer whose status the document leaves out
/// fails; `isinstance` checks fail when a body does not match its documented model.
const ERRORS_SCRIPT: &str = r#"
import io, sys
from hearth_client import AuthenticatedClient, Client
from hearth_client.api.node import get_health, get_metrics
from hearth_client.api.sandboxes import create_sandbox, delete_sandbox, get_sandbox, list_sandboxes
from hearth_client.api.exec_ import exec_in_sandbox, exec_in_sandbox_web_socket
from hearth_client.api.files import get_sandbox_file, put_sandbox_file
from hearth_client.api.network import get_sandbox_network, set_sandbox_network
from hearth_client.api.ports import proxy_sandbox_port, tunnel_sandbox_port
from hearth_client.api.runs import run_once
from hearth_client.models import CreateSandbox, ErrorBody, ExecBody, Health, SandboxList
from hearth_client.types import File

url, token = sys.argv[1], sys.argv[2]
anonymous = Client(base_url=url, raise_on_unexpected_status=True)
alice = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)
stranger = AuthenticatedClient(base_url=url, token="not-a-known-token", raise_on_unexpected_status=True)

health = get_health.sync(client=anonymous)
assert isinstance(health, Health) and health.status == "ok", health
metrics = get_metrics.sync(client=anonymous)
assert "hearth_boots_total" in metrics, metrics

listed = list_sandboxes.sync(client=alice)
assert isinstance(listed, SandboxList) and listed.sandboxes == [], listed

def error(response, status, code):
    assert response.status_code == status, (response.status_code, response.content)
    assert isinstance(response.parsed, ErrorBody), response.parsed
    assert response.parsed.code == code, response.parsed

error(list_sandboxes.sync_detailed(client=stranger), 401, "unauthorized")
error(get_sandbox.sync_detailed(client=alice, id="nope"), 404, "not_found")
error(delete_sandbox.sync_detailed(client=alice, id="nope"), 404, "not_found")
error(create_sandbox.sync_detailed(client=alice, body=CreateSandbox(image=" ")), 400, "invalid")
error(exec_in_sandbox.sync_detailed(client=alice, id="nope", body=ExecBody(argv=["true"])), 404, "not_found")
upload = File(payload=io.BytesIO(b"hello"), file_name="x", mime_type="application/octet-stream")
error(put_sandbox_file.sync_detailed(client=alice, id="nope", path="/tmp/x", body=upload), 404, "not_found")
error(get_sandbox_file.sync_detailed(client=alice, id="nope", path="/etc/hostname"), 404, "not_found")
error(get_sandbox_network.sync_detailed(client=alice, id="nope"), 404, "not_found")
error(proxy_sandbox_port.sync_detailed(client=alice, id="nope", port=8000, path="index.html"), 404, "not_found")
# Exist and are callable: the WebSocket routes, the network update and one-shot runs.
for function in (exec_in_sandbox_web_socket, tunnel_sandbox_port, set_sandbox_network, run_once):
    assert callable(function.sync_detailed), function
print("client ok")
"#;

/// The generated client on a real sandbox (argv: URL, token, image): every success answer parses
/// into its documented model, bytes go up and come back as files, and the exec stream is lines of
/// `ExecEvent`s.
const SANDBOX_SCRIPT: &str = r#"
import base64, io, json, sys
from hearth_client import AuthenticatedClient
from hearth_client.api.sandboxes import create_sandbox, delete_sandbox, get_sandbox
from hearth_client.api.exec_ import exec_in_sandbox
from hearth_client.api.files import get_sandbox_file, put_sandbox_file
from hearth_client.models import CreateSandbox, ErrorBody, ExecBody, ExecEvent, FileWritten, Sandbox, SandboxState
from hearth_client.types import File

url, token, image = sys.argv[1:4]
alice = AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True, timeout=300)

created = create_sandbox.sync_detailed(client=alice, body=CreateSandbox(image=image, memory="256m", ttl_seconds=600))
sandbox = created.parsed
assert created.status_code == 201 and isinstance(sandbox, Sandbox), (created.status_code, created.content)
assert sandbox.state == SandboxState.RUNNING, sandbox
try:
    data = b"\x00\xffbinary\n" * 1000
    upload = File(payload=io.BytesIO(data), mime_type="application/octet-stream")
    written = put_sandbox_file.sync(client=alice, id=sandbox.id, path="/tmp/blob", mode="600", body=upload)
    assert isinstance(written, FileWritten) and written.bytes_ == len(data), written  # `bytes` is a builtin

    download = get_sandbox_file.sync_detailed(client=alice, id=sandbox.id, path="/tmp/blob")
    assert isinstance(download.parsed, File) and download.parsed.payload.read() == data, download.status_code
    assert download.headers["x-hearth-mode"] == "600", download.headers

    ran = exec_in_sandbox.sync(client=alice, id=sandbox.id, body=ExecBody(argv=["sh", "-c", "wc -c < /tmp/blob"]))
    events = [ExecEvent.from_dict(json.loads(line)) for line in ran.payload.read().splitlines()]
    stdout = b"".join(base64.b64decode(e.stdout) for e in events if isinstance(e.stdout, str))
    assert stdout.strip() == str(len(data)).encode() and events[-1].exit_code == 0, events

    again = get_sandbox.sync(client=alice, id=sandbox.id)
    assert isinstance(again, Sandbox) and again.id == sandbox.id, again
finally:
    gone = delete_sandbox.sync_detailed(client=alice, id=sandbox.id)
assert gone.status_code == 204, gone.status_code
missing = get_sandbox.sync(client=alice, id=sandbox.id)
assert isinstance(missing, ErrorBody) and missing.code == "not_found", missing
print("sandbox ok")
"#;

/// What broke client authors before: a document the validator refuses (two operations named
/// `get`), one the generator warns about (bodies it cannot type), a client that throws on an
/// undocumented status or on an error body that does not match its model.
#[tokio::test(flavor = "multi_thread")]
async fn standard_tools_accept_the_document_and_its_client_handles_errors() {
    let client = Generated::new();
    let home = Home::new(TOKENS);
    let daemon = Daemon::start(&home, &[]);
    client.run(ERRORS_SCRIPT, &[&daemon.url, ALICE], "client ok", &daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_generated_client_drives_a_real_sandbox() {
    let client = Generated::new();
    let home = Home::new(TOKENS);
    let daemon = Daemon::start(&home, &[]);
    let image = image("busybox");
    client.run(
        SANDBOX_SCRIPT,
        &[&daemon.url, ALICE, &image],
        "sandbox ok",
        &daemon,
    );
}

/// The document validated and a Python client generated from it, in a temporary directory.
struct Generated {
    venv: PathBuf,
    dir: tempfile::TempDir,
}

impl Generated {
    fn new() -> Generated {
        let venv = python_env();
        let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let validated = run(Command::new(venv.join("bin/openapi-spec-validator")).arg(&document));
        assert!(
            validated.status.success(),
            "openapi-spec-validator refused {}:\n{}",
            document.display(),
            text(&validated)
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("generator.json");
        std::fs::write(&config, GENERATOR_CONFIG).unwrap();
        let generated = run(Command::new(venv.join("bin/openapi-python-client"))
            .args(["generate", "--meta", "none", "--fail-on-warning", "--path"])
            .arg(&document)
            .arg("--config")
            .arg(&config)
            .arg("--output-path")
            .arg(dir.path().join("hearth_client")));
        let report = text(&generated);
        assert!(
            generated.status.success() && !report.contains("Warning"),
            "openapi-python-client complained about {}:\n{report}",
            document.display()
        );
        Generated { venv, dir }
    }

    /// Runs `script` with `args` by the venv's Python with the client importable; it must succeed
    /// and print `done`.
    fn run(&self, script: &str, args: &[&str], done: &str, daemon: &Daemon) {
        let path = self.dir.path().join("script.py");
        std::fs::write(&path, script).unwrap();
        let ran = run(Command::new(self.venv.join("bin/python"))
            .arg(&path)
            .args(args)
            .env("PYTHONPATH", self.dir.path()));
        assert!(
            ran.status.success() && String::from_utf8_lossy(&ran.stdout).contains(done),
            "the generated client failed against the daemon:\n{}\ndaemon log:\n{}",
            text(&ran),
            daemon.log_text()
        );
    }
}

/// The suite's Python venv (created on first use), from `scripts/python-env.sh`.
fn python_env() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python-env.sh");
    let out = run(&mut Command::new(&script));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        text(&out)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
