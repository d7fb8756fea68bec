//! What each tool does, as plain methods that return JSON for the model or an error with the
//! daemon's message: argument checks, the daemon call through [`crate::client::Client`], and
//! bounding the answer (`output`). Touches only the daemon.

use std::sync::Arc;

use anyhow::{bail, Context};
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};

use super::ledger::Session;
use super::output::{bound_text, HeadTail, LIST_MAX, READ_DEFAULT, READ_MAX, STREAM_LIMIT};
use super::params::{self, Encoding};
use super::tools::SandboxTools;
use crate::serve::api::{CreateSandbox, DirListing, ExecBody, Sandbox, SandboxState};
use crate::serve::code::RunCode;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The argv of a tool's `command` (a shell line, run with `/bin/sh -c`) or `argv`: exactly one.
pub(super) fn command_argv(
    command: Option<String>,
    argv: Option<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    Ok(match (command, argv) {
        (Some(line), None) => vec!["/bin/sh".to_string(), "-c".to_string(), line],
        (None, Some(argv)) if !argv.is_empty() => argv,
        (None, Some(_)) => bail!("argv is empty: give the program and its arguments"),
        _ => bail!("give exactly one of command (a shell line) and argv (a list)"),
    })
}

/// `exec`'s timeout when the model gives none: a tool call should not wait forever.
const EXEC_TIMEOUT_SECONDS: u64 = 120;

impl SandboxTools {
    /// Creates the sandbox and, unless kept (`owner` None), hands it to `owner` to end.
    pub(super) async fn create(
        &self,
        p: params::CreateSandbox,
        owner: Option<Arc<Session>>,
    ) -> anyhow::Result<Value> {
        let mut labels = std::collections::BTreeMap::new();
        if owner.is_some() {
            labels.extend([self.ledger.label()]);
        }
        let body = CreateSandbox {
            image: p.image,
            labels,
            cpus: p.cpus,
            memory: p.memory,
            disk: p.disk,
            ttl_seconds: p.ttl_seconds,
            idle_timeout_seconds: p.idle_timeout_seconds,
            on_idle: p.on_idle.map(|o| match o {
                params::OnIdle::Stop => crate::serve::api::OnIdle::Stop,
                params::OnIdle::Pause => crate::serve::api::OnIdle::Pause,
            }),
            env: p.env,
            workdir: p.workdir,
            network: p.network.as_ref().map(|n| n.policy()).transpose()?,
            wait: Some(true),
            ..CreateSandbox::default()
        };
        let (_, sandbox) = self.client.create(&body).await?;
        if let Some(owner) = &owner {
            owner.adopt(&sandbox.id);
        }
        let mut answer = summary(&sandbox);
        answer["lifetime"] = json!(lifetime(owner.as_deref()));
        if sandbox.state == SandboxState::Creating {
            answer["note"] = json!(
                "still starting (the daemon's create wait passed): other tools answer `conflict` \
                 until it runs"
            );
        }
        Ok(answer)
    }

    /// Forks the sandbox; `owner` (unless kept) ends the copies.
    pub(super) async fn fork(
        &self,
        p: params::Fork,
        owner: Option<Arc<Session>>,
    ) -> anyhow::Result<Value> {
        let children = self
            .client
            .fork(&p.sandbox_id, p.count.unwrap_or(1))
            .await?;
        for child in &children {
            match &owner {
                Some(owner) => owner.adopt(&child.id),
                // A child has its parent's labels, so maybe ours: keep it all the same.
                None => self.ledger.keep(&child.id),
            }
        }
        Ok(json!({
            "sandboxes": children.iter().map(summary).collect::<Vec<_>>(),
            "lifetime": lifetime(owner.as_deref()),
        }))
    }

    pub(super) async fn run_code_call(&self, p: params::RunCode) -> anyhow::Result<Value> {
        let body = RunCode {
            code: p.code,
            language: p.language,
            timeout_seconds: p.timeout_seconds,
        };
        let run = self.client.run_code(&p.sandbox_id, &body).await?;
        let (stdout, stdout_cut) = bound_text(&run.stdout, STREAM_LIMIT);
        let (stderr, stderr_cut) = bound_text(&run.stderr, STREAM_LIMIT);
        let result = run.result.map(|r| bound_text(&r, STREAM_LIMIT).0);
        let error = run.error.map(|e| {
            json!({
                "name": e.name,
                "message": bound_text(&e.message, STREAM_LIMIT).0,
                "traceback": bound_text(&e.traceback, STREAM_LIMIT).0,
            })
        });
        Ok(json!({
            "stdout": stdout,
            "stderr": stderr,
            "result": result,
            "error": error,
            "timed_out": run.timed_out,
            "restarted": run.restarted,
            "execution_count": run.execution_count,
            "truncated": run.truncated || stdout_cut || stderr_cut,
        }))
    }

    pub(super) async fn exec_call(&self, p: params::Exec) -> anyhow::Result<Value> {
        let body = ExecBody {
            argv: command_argv(p.command, p.argv)?,
            env: p.env,
            workdir: p.workdir,
            user: p.user,
            timeout_seconds: Some(p.timeout_seconds.unwrap_or(EXEC_TIMEOUT_SECONDS)),
            stdin: p.stdin.map(|text| B64.encode(text)),
        };
        let events = self.client.exec(&p.sandbox_id, &body).await?;
        let mut events = std::pin::pin!(events);
        let (mut stdout, mut stderr) = (HeadTail::new(STREAM_LIMIT), HeadTail::new(STREAM_LIMIT));
        let mut end = None;
        while let Some(event) = events.next().await {
            let event = event?;
            if let Some(data) = &event.stdout {
                stdout.push(&B64.decode(data).context("the daemon sent invalid base64")?);
            }
            if let Some(data) = &event.stderr {
                stderr.push(&B64.decode(data).context("the daemon sent invalid base64")?);
            }
            if let Some(error) = event.error {
                bail!("the command's run failed on hearth's side: {error}");
            }
            if event.exit_code.is_some() || event.signal.is_some() {
                end = Some(event);
            }
        }
        let end = end.context("the exec stream ended without the command's exit status")?;
        let truncated = stdout.truncated() || stderr.truncated();
        Ok(json!({
            "exit_code": end.exit_code,
            "signal": end.signal,
            "timed_out": end.timed_out.unwrap_or(false),
            "stdout": stdout.into_text(),
            "stderr": stderr.into_text(),
            "truncated": truncated,
        }))
    }

    pub(super) async fn write_file_call(&self, p: params::WriteFile) -> anyhow::Result<Value> {
        let bytes = match p.encoding {
            Encoding::Text => p.content.into_bytes(),
            Encoding::Base64 => B64
                .decode(p.content.trim())
                .context("content is not valid base64")?,
        };
        let mode = match p.mode.as_deref() {
            None => 0o644,
            Some(text) => u32::from_str_radix(text, 8)
                .ok()
                .filter(|&m| m <= 0o7777)
                .with_context(|| format!("mode {text:?} is not octal permission bits like 644"))?,
        };
        let written = self
            .client
            .put_file(&p.sandbox_id, &p.path, mode, bytes.into())
            .await?;
        Ok(json!({ "path": written.path, "bytes": written.bytes }))
    }

    pub(super) async fn read_file_call(&self, p: params::ReadFile) -> anyhow::Result<Value> {
        let limit = p.max_bytes.unwrap_or(READ_DEFAULT).clamp(1, READ_MAX) as usize;
        let response = self.client.get_file(&p.sandbox_id, &p.path).await?;
        if is_json(&response) {
            bail!("{} is a directory: use list_files", p.path);
        }
        let mut body = response.bytes_stream();
        let mut bytes = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the file's download broke")?;
            let room = limit - bytes.len();
            if chunk.len() > room {
                bytes.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        let content = match p.encoding {
            Encoding::Base64 => B64.encode(&bytes),
            Encoding::Text => match std::str::from_utf8(&bytes) {
                Ok(text) => text.to_string(),
                // A character cut at the limit: keep what is whole.
                Err(e) if truncated && e.error_len().is_none() => {
                    String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
                }
                Err(_) => bail!(
                    "{} is not UTF-8 text (a binary file?): read it with encoding base64",
                    p.path
                ),
            },
        };
        Ok(json!({
            "path": p.path,
            "encoding": match p.encoding { Encoding::Text => "text", Encoding::Base64 => "base64" },
            "content": content,
            "bytes": bytes.len(),
            "truncated": truncated,
        }))
    }

    pub(super) async fn list_files_call(&self, p: params::ListFiles) -> anyhow::Result<Value> {
        let response = self.client.get_file(&p.sandbox_id, &p.path).await?;
        if !is_json(&response) {
            bail!("{} is a file, not a directory: use read_file", p.path);
        }
        let listing: DirListing = response
            .json()
            .await
            .context("reading the directory listing")?;
        let more = listing.entries.len() > LIST_MAX;
        let entries: Vec<Value> = listing
            .entries
            .iter()
            .take(LIST_MAX)
            .map(|e| {
                let mut entry = json!({
                    "name": e.name,
                    "kind": e.kind,
                    "size": e.size,
                    "mode": format!("{:o}", e.mode & 0o7777),
                });
                if let Some(target) = &e.link_target {
                    entry["link_target"] = json!(target);
                }
                entry
            })
            .collect();
        Ok(json!({
            "path": listing.path,
            "entries": entries,
            "truncated": listing.truncated || more,
        }))
    }

    pub(super) async fn destroy(&self, id: &str) -> anyhow::Result<Value> {
        self.client.delete(id).await?;
        self.ledger.forget(id);
        Ok(json!({ "sandbox_id": id, "destroyed": true }))
    }

    pub(super) async fn pause(&self, id: &str) -> anyhow::Result<Value> {
        Ok(summary(&self.client.pause(id, false).await?))
    }

    pub(super) async fn resume(&self, id: &str) -> anyhow::Result<Value> {
        Ok(summary(&self.client.resume(id).await?))
    }

    pub(super) async fn set_network_call(&self, p: params::SetNetwork) -> anyhow::Result<Value> {
        let policy = p.network.policy()?;
        self.client.network(&p.sandbox_id, Some(&policy)).await
    }
}

/// How long a sandbox owned by `owner` (None: kept) lives, for the model.
fn lifetime(owner: Option<&Session>) -> &'static str {
    match owner {
        None => "kept: lives until destroy_sandbox or its TTL",
        Some(s) if s.is_server() => {
            "no MCP session (sessionless HTTP): lives until destroy_sandbox, its TTL, or until \
             this MCP server stops"
        }
        Some(_) => "destroyed when this MCP session ends (or at destroy_sandbox or its TTL)",
    }
}

/// What the model needs of a sandbox record.
fn summary(s: &Sandbox) -> Value {
    json!({
        "sandbox_id": s.id,
        "state": s.state,
        "image": s.image,
        "cpus": s.cpus,
        "memory_mib": s.memory_mib,
        "boot_ms": s.boot_ms,
        "expires_at_unix_ms": s.expires_at,
        "reason": s.reason,
    })
}

/// A directory listing answers JSON; a file's content answers octet-stream.
fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}
