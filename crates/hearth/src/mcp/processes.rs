//! The background-process tools' work (`start_process`, `process_output`, `stop_process`): a
//! server or watcher started in a sandbox runs on between tool calls, and the model reads what it
//! printed since its last look by the offset it was handed, or waits (a bounded time) for it to
//! end instead of polling. Answers are bounded like exec's.

use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};

use super::calls::command_argv;
use super::output::{HeadTail, STREAM_LIMIT};
use super::params;
use super::tools::SandboxTools;
use crate::serve::processes::StartProcess;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Longest `wait_seconds` of `process_output` (MCP clients give a tool call about a minute).
const MAX_WAIT_SECONDS: u32 = 60;

impl SandboxTools {
    pub(super) async fn start_process_call(
        &self,
        p: params::StartProcess,
    ) -> anyhow::Result<Value> {
        let body = StartProcess {
            argv: command_argv(p.command, p.argv)?,
            env: p.env,
            workdir: p.workdir,
            user: p.user,
            timeout_seconds: p.timeout_seconds,
            open_stdin: false,
            tag: p.tag,
            keep_awake: p.keep_awake,
        };
        if p.wait_seconds.unwrap_or(0) > MAX_WAIT_SECONDS {
            bail!("wait_seconds is at most {MAX_WAIT_SECONDS}: start it, then wait with process_output");
        }
        let process = self.client.start_process(&p.sandbox_id, &body).await?;
        let Some(wait) = p.wait_seconds.filter(|&w| w > 0) else {
            return Ok(json!({
                "process_id": process.id,
                "running": process.running,
                "next_offset": 0,
            }));
        };
        let mut answer = self
            .process_output_call(params::ProcessOutput {
                sandbox_id: p.sandbox_id,
                process_id: process.id,
                offset: None,
                wait_seconds: Some(wait),
            })
            .await?;
        answer["process_id"] = process.id.into();
        Ok(answer)
    }

    pub(super) async fn process_output_call(
        &self,
        p: params::ProcessOutput,
    ) -> anyhow::Result<Value> {
        let offset = p.offset.unwrap_or(0);
        let wait = p.wait_seconds.unwrap_or(0);
        if wait > MAX_WAIT_SECONDS {
            bail!(
                "wait_seconds is at most {MAX_WAIT_SECONDS}, not {wait}: call again to wait longer"
            );
        }
        // Waiting is following the output until the process ends, cut off at the deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.into());
        let (start, events) = self
            .client
            .process_output(&p.sandbox_id, p.process_id, offset, wait > 0)
            .await?;
        let mut events = std::pin::pin!(events);
        let (mut stdout, mut stderr) = (HeadTail::new(STREAM_LIMIT), HeadTail::new(STREAM_LIMIT));
        let (mut read, mut end) = (0u64, None);
        loop {
            let next = match wait {
                // Not following: the kept output, read whole.
                0 => events.next().await,
                _ => match tokio::time::timeout_at(deadline, events.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some(event) = next else {
                break;
            };
            let event = event?;
            for (data, into) in [(&event.stdout, &mut stdout), (&event.stderr, &mut stderr)] {
                if let Some(data) = data {
                    let bytes = B64.decode(data).context("the daemon sent invalid base64")?;
                    read += bytes.len() as u64;
                    into.push(&bytes);
                }
            }
            if event.exit_code.is_some() || event.signal.is_some() || event.error.is_some() {
                end = Some(event);
            }
        }
        let truncated = stdout.truncated() || stderr.truncated();
        Ok(json!({
            "stdout": stdout.into_text(),
            "stderr": stderr.into_text(),
            "truncated": truncated,
            "running": end.is_none(),
            "exit_code": end.as_ref().and_then(|e| e.exit_code),
            "signal": end.as_ref().and_then(|e| e.signal),
            "lost": end.and_then(|e| e.error),
            // Where the next call reads on; `skipped`: bytes from `offset` the daemon no longer
            // kept.
            "next_offset": start + read,
            "skipped": start.saturating_sub(offset),
        }))
    }

    pub(super) async fn stop_process_call(&self, p: params::StopProcess) -> anyhow::Result<Value> {
        self.client
            .signal_process(&p.sandbox_id, p.process_id, p.signal)
            .await?;
        Ok(json!({ "process_id": p.process_id, "removed": p.signal.is_none() }))
    }
}
