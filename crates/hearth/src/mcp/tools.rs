//! The MCP tools: one thin method per tool (its schema comes from `params`, its description is
//! what the model reads to choose and use it), each calling the daemon through the one
//! [`Client`] and turning the answer into a bounded result (`output`). Failures — the daemon's
//! refusals with its own message included, bad arguments — are tool results with
//! `isError: true`, which the model sees, never protocol errors. The work itself is in `calls.rs`.

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};

use super::features::{self, Features};
use super::ledger::{Ledger, Session};
use super::params;
use crate::client::Client;

const INSTRUCTIONS: &str = "Sandboxes are microVMs booted from OCI images by hearth. Create one \
with create_sandbox, then run commands (exec), Python (run_code, state kept between calls), and \
move files (write_file, read_file, list_files) by its sandbox_id; start_process runs a server or \
watcher in the background, read with process_output. Sandboxes created in this \
session are destroyed when it ends unless created with keep: true; destroy_sandbox ends one \
sooner. Long outputs come back shortened with a note.";

/// Makes one [`SandboxTools`] per MCP session, sharing the client and the ledger.
#[derive(Clone)]
pub struct Toolbox {
    client: Arc<Client>,
    ledger: Arc<Ledger>,
    router: ToolRouter<SandboxTools>,
}

impl Toolbox {
    /// The tools this daemon supports: the optional ones only where `features` lists their route.
    pub fn new(client: Arc<Client>, ledger: Arc<Ledger>, features: &Features) -> Toolbox {
        let mut router = SandboxTools::tool_router();
        for (route, tool) in [
            (features::RUN_CODE, "run_code"),
            (features::PAUSE, "pause_sandbox"),
            (features::RESUME, "resume_sandbox"),
            (features::SET_NETWORK, "set_network"),
            (features::FORK, "fork_sandbox"),
            (features::PROCESSES, "start_process"),
            (features::PROCESSES, "process_output"),
            (features::PROCESSES, "stop_process"),
        ] {
            if !features.has(route) {
                tracing::info!(
                    tool,
                    "the daemon lacks {} {}: not offered",
                    route.0,
                    route.1
                );
                router.remove_route(tool);
            }
        }
        Toolbox {
            client,
            ledger,
            router,
        }
    }

    /// The handler of a new MCP session (or of one sessionless HTTP request).
    pub fn session(&self) -> SandboxTools {
        SandboxTools {
            client: self.client.clone(),
            ledger: self.ledger.clone(),
            session: self.ledger.open(),
            router: self.router.clone(),
        }
    }
}

/// One MCP session's handler.
#[derive(Clone)]
pub struct SandboxTools {
    pub(super) client: Arc<Client>,
    pub(super) ledger: Arc<Ledger>,
    session: Arc<Session>,
    router: ToolRouter<SandboxTools>,
}

type ToolResult = Result<CallToolResult, ErrorData>;

/// A tool's outcome as MCP sees it: JSON (text and structured content) or an error the model reads.
fn reply(outcome: anyhow::Result<serde_json::Value>) -> ToolResult {
    Ok(match outcome {
        Ok(value) => CallToolResult::structured(value),
        Err(err) => CallToolResult::error(vec![ContentBlock::text(crate::report::chain(&err))]),
    })
}

#[tool_router(vis = "pub(super)")]
impl SandboxTools {
    #[tool(
        description = "Create a sandbox: a microVM booted from an OCI image, with its own \
        filesystem, processes and (per policy) network. Waits until it runs (seconds; longer the \
        first time an image is pulled) and returns its sandbox_id for the other tools. It is \
        destroyed when this MCP session ends unless keep is true, and stops at its TTL either \
        way. Errors name the cause: unknown image, quota or node capacity exhausted (retry \
        later), invalid sizes."
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<params::CreateSandbox>,
        context: RequestContext<RoleServer>,
    ) -> ToolResult {
        let owner = self.owner(p.keep, &context);
        reply(self.create(p, owner).await)
    }

    #[tool(
        description = "Run Python code in a sandbox's interpreter, like a notebook cell: \
        names defined in one call are visible in the next (also after the sandbox was paused and \
        resumed, and in its forks). Returns stdout, stderr, result (the \
        repr of the last expression, if the code ends with one) and error (an exception's name, \
        message and traceback: a result, not a tool error). A timeout interrupts the code and \
        keeps the interpreter; if the interpreter died it is restarted (restarted: true, earlier \
        names gone). The image needs python3. Outputs over 32 KiB are shortened.",
        annotations(open_world_hint = false)
    )]
    async fn run_code(&self, Parameters(p): Parameters<params::RunCode>) -> ToolResult {
        reply(self.run_code_call(p).await)
    }

    #[tool(
        description = "Run a command in a sandbox and wait for it: a shell command line \
        (command, run with /bin/sh -c) or an argv. Returns exit_code (or signal), stdout and \
        stderr as text (bytes that are not UTF-8 show as U+FFFD); a non-zero exit is a result, \
        not a tool error. Killed after timeout_seconds (default 120, timed_out: true). Each \
        stream over 32 KiB comes back as its head and tail with a note of what was left out.",
        annotations(open_world_hint = false)
    )]
    async fn exec(&self, Parameters(p): Parameters<params::Exec>) -> ToolResult {
        reply(self.exec_call(p).await)
    }

    #[tool(
        description = "Start a command in a sandbox in the background and return at once with \
        its process_id: for servers, watchers and long builds that should run on between calls \
        (exec waits for the end). Read what it printed with process_output; stop it with \
        stop_process. It keeps running while the sandbox is paused and resumed. At most 16 per \
        sandbox. With wait_seconds (up to 60) the call first waits that long for it to end: \
        for a build or test run that may be quick or not, one call either way.",
        annotations(open_world_hint = false)
    )]
    async fn start_process(&self, Parameters(p): Parameters<params::StartProcess>) -> ToolResult {
        reply(self.start_process_call(p).await)
    }

    #[tool(
        description = "Read what a background process (start_process) printed: stdout and \
        stderr from offset (pass the next_offset of your previous call to get only what is new), \
        whether it still runs, and its exit_code or signal once it ended. To wait for it to end \
        (a build, a test run) pass wait_seconds (up to 60) instead of calling again and again: \
        the call returns as soon as it ends. The daemon keeps the last 1 MiB; over 32 KiB per \
        stream comes back as head and tail with a note.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn process_output(&self, Parameters(p): Parameters<params::ProcessOutput>) -> ToolResult {
        reply(self.process_output_call(p).await)
    }

    #[tool(
        description = "Stop a background process: without signal it is killed (with every \
        process it started) and forgotten; with signal (15 SIGTERM, 2 SIGINT) that signal is \
        sent and it stays listed.",
        annotations(destructive_hint = true, open_world_hint = false)
    )]
    async fn stop_process(&self, Parameters(p): Parameters<params::StopProcess>) -> ToolResult {
        reply(self.stop_process_call(p).await)
    }

    #[tool(
        description = "Write a file in a sandbox (replacing it if it exists): text, or \
        binary as base64. The parent directory must exist. Errors: no such directory, \
        permission denied, larger than the daemon allows.",
        annotations(idempotent_hint = true, open_world_hint = false)
    )]
    async fn write_file(&self, Parameters(p): Parameters<params::WriteFile>) -> ToolResult {
        reply(self.write_file_call(p).await)
    }

    #[tool(
        description = "Read a file from a sandbox: as text (refused, with a note, if it is \
        not UTF-8) or as base64. At most max_bytes (default 64 KiB, at most 1 MiB) from the \
        start come back; truncated says whether there was more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(&self, Parameters(p): Parameters<params::ReadFile>) -> ToolResult {
        reply(self.read_file_call(p).await)
    }

    #[tool(
        description = "List a directory in a sandbox: each entry's name, kind (file, dir, \
        symlink, other), size and permission bits. At most 1000 entries; truncated says whether \
        there were more.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list_files(&self, Parameters(p): Parameters<params::ListFiles>) -> ToolResult {
        reply(self.list_files_call(p).await)
    }

    #[tool(
        description = "Destroy a sandbox now: its VM stops and its files are gone. Works \
        on kept sandboxes too.",
        annotations(
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn destroy_sandbox(&self, Parameters(p): Parameters<params::SandboxId>) -> ToolResult {
        reply(self.destroy(&p.sandbox_id).await)
    }

    #[tool(
        description = "Pause a running sandbox: its whole state (memory, processes, files) \
        is saved to disk and its VM ends, freeing CPU and memory until resume_sandbox. Refused \
        while a command runs in it.",
        annotations(open_world_hint = false)
    )]
    async fn pause_sandbox(&self, Parameters(p): Parameters<params::SandboxId>) -> ToolResult {
        reply(self.pause(&p.sandbox_id).await)
    }

    #[tool(
        description = "Resume a paused sandbox exactly as it was paused (processes, memory, \
        files).",
        annotations(open_world_hint = false)
    )]
    async fn resume_sandbox(&self, Parameters(p): Parameters<params::SandboxId>) -> ToolResult {
        reply(self.resume(&p.sandbox_id).await)
    }

    #[tool(
        description = "Replace a running sandbox's outbound network policy: none, allow \
        (only the listed domains, wildcards, IPs or CIDRs) or open (anything but deny). The \
        daemon may cap what a tenant can open; it says so when it refuses.",
        annotations(open_world_hint = false)
    )]
    async fn set_network(&self, Parameters(p): Parameters<params::SetNetwork>) -> ToolResult {
        reply(self.set_network_call(p).await)
    }

    #[tool(
        description = "Copy a running sandbox: count new sandboxes (1 to 64) with its processes, \
        memory and files as of now, each with its own id, hostname and network identity; the \
        original runs on. All or nothing. The copies end with this MCP session unless keep is \
        true. Refused when the original is not running or the quota or node capacity would be \
        exceeded.",
        annotations(open_world_hint = false)
    )]
    async fn fork_sandbox(
        &self,
        Parameters(p): Parameters<params::Fork>,
        context: RequestContext<RoleServer>,
    ) -> ToolResult {
        let owner = self.owner(p.keep, &context);
        reply(self.fork(p, owner).await)
    }
}

impl SandboxTools {
    /// Who ends a sandbox created by this request: no one when kept; the server for a sessionless
    /// streamable HTTP request (the 2026 protocol), which has no end to wait for; else the session.
    fn owner(&self, keep: bool, context: &RequestContext<RoleServer>) -> Option<Arc<Session>> {
        let sessionless = context
            .extensions
            .get::<axum::http::request::Parts>()
            .is_some_and(|parts| !parts.headers.contains_key("mcp-session-id"));
        match (keep, sessionless) {
            (true, _) => None,
            (false, true) => Some(self.ledger.server()),
            (false, false) => Some(self.session.clone()),
        }
    }
}

#[tool_handler(router = self.router)]
impl ServerHandler for SandboxTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("hearth", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}
