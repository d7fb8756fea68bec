//! Flow control end to end: a command printing 200 MiB is streamed to a host reader that pauses,
//! while the resident memory of both the agent process and this (host) process stays bounded.

mod common;

use std::time::Duration;

use common::*;
use hearth_vm::channel::ExecOutput;

const TOTAL: u64 = 200 * 1024 * 1024;
/// Allowed growth over the baseline: windows are 1 MiB per stream and 4 MiB per connection, so
/// anything near the output size means flow control is broken.
const MAX_GROWTH_KIB: u64 = 32 * 1024;

#[tokio::test]
async fn two_hundred_mib_streams_with_bounded_memory_on_both_sides() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    assert!(sh(&client, "true").await.status.success());
    let (host_base, agent_base) = (rss_kib(std::process::id()), rss_kib(agent.pid()));

    let mut handle = client
        .exec(request(&["head", "-c", &TOTAL.to_string(), "/dev/zero"]))
        .await
        .unwrap();
    let (mut received, mut host_peak, mut agent_peak) = (0u64, 0, 0);
    let mut next_sample = 0;
    let mut paused = false;
    while let Some(output) = handle.next_output().await.unwrap() {
        let ExecOutput::Stdout(bytes) = output else {
            panic!("unexpected stderr output");
        };
        assert!(bytes.iter().all(|&b| b == 0));
        received += bytes.len() as u64;
        if received >= next_sample {
            next_sample += 4 * 1024 * 1024;
            host_peak = host_peak.max(rss_kib(std::process::id()));
            agent_peak = agent_peak.max(rss_kib(agent.pid()));
        }
        if !paused && received > TOTAL / 2 {
            // A stalled reader: the command must block in the guest rather than buffer anywhere.
            paused = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
            agent_peak = agent_peak.max(rss_kib(agent.pid()));
            host_peak = host_peak.max(rss_kib(std::process::id()));
        }
    }
    assert_eq!(received, TOTAL);
    assert!(handle.status().unwrap().success());
    eprintln!(
        "RSS KiB: host {host_base} -> peak {host_peak}, agent {agent_base} -> peak {agent_peak}"
    );
    assert!(
        host_peak.saturating_sub(host_base) < MAX_GROWTH_KIB,
        "host RSS grew from {host_base} KiB to {host_peak} KiB"
    );
    assert!(
        agent_peak.saturating_sub(agent_base) < MAX_GROWTH_KIB,
        "agent RSS grew from {agent_base} KiB to {agent_peak} KiB"
    );
}
