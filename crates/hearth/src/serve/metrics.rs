//! `GET /metrics`: the node's counters in the Prometheus text format (version 0.0.4). Without a
//! token it holds aggregate numbers only (no tenant names, sandbox ids or images), so a scraper
//! needs none. With a tenant's bearer token it adds that tenant's running sandboxes' network
//! counters (bytes, connections, refused attempts; labels `sandbox`, `tenant`), from the same
//! source as `GET /v1/sandboxes/{id}/network`; never another tenant's. Rendering is a pure
//! function of the snapshots.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use hearth_sandbox::node::{NodeMetrics, SandboxNetworkStats, State as NodeState};

use super::auth::Authenticated;
use super::AppState;

#[utoipa::path(get, path = "/metrics", tag = "node", operation_id = "getMetrics",
    responses((status = 200, description = "Prometheus text format: hearth_sandboxes{state}, hearth_boots_total, \
        hearth_boot_failures_total, hearth_boot_seconds (histogram), hearth_execs_total, hearth_idle_pauses_total, \
        hearth_wakes_total, hearth_image_cache_bytes, \
        hearth_capacity_vcpus, hearth_capacity_memory_bytes, hearth_allocated_vcpus, hearth_allocated_memory_bytes, hearth_template_memory_bytes, hearth_warm_pool_ready; \
        with a tenant's bearer token (optional) also that tenant's running sandboxes' hearth_sandbox_network_* series \
        {sandbox, tenant}: sent/received bytes, connections, open connections, refused connections and DNS queries",
        content_type = "text/plain", body = String),
        (status = 401, description = "A token was sent but is unknown or malformed", body = super::api::ErrorBody)))]
pub async fn metrics(State(state): State<Arc<AppState>>, mut parts: Parts) -> Response {
    // A token is optional here; one that is sent must be valid (401 otherwise).
    let tenant = match parts.headers.contains_key(header::AUTHORIZATION) {
        false => None,
        true => match Authenticated::from_request_parts(&mut parts, &state).await {
            Ok(Authenticated(tenant)) => Some(tenant.name),
            Err(e) => return e.into_response(),
        },
    };
    let node = state.node.clone();
    // The snapshot may read the image cache's size from disk: keep it off the async workers.
    let (snapshot, networks) = tokio::task::spawn_blocking(move || {
        let networks = tenant.map_or_else(Vec::new, |t| node.network_stats(&t));
        (node.metrics(), networks)
    })
    .await
    .expect("metrics task");
    let mut text = render(&snapshot);
    text.push_str(&render_networks(&networks));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub fn render(m: &NodeMetrics) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP hearth_sandboxes Sandboxes by state.\n# TYPE hearth_sandboxes gauge"
    );
    for state in [
        NodeState::Creating,
        NodeState::Running,
        NodeState::Paused,
        NodeState::Stopped,
        NodeState::Failed,
    ] {
        let count = m.sandboxes.get(state);
        let _ = writeln!(out, "hearth_sandboxes{{state=\"{state}\"}} {count}");
    }
    let simple: [(&str, &str, &str, String); 13] = [
        (
            "hearth_boots_total",
            "counter",
            "Sandbox boots started.",
            m.boots_total.to_string(),
        ),
        (
            "hearth_boot_failures_total",
            "counter",
            "Sandbox boots that failed.",
            m.boot_failures_total.to_string(),
        ),
        (
            "hearth_execs_total",
            "counter",
            "Commands started in sandboxes.",
            m.execs_total.to_string(),
        ),
        (
            "hearth_idle_pauses_total",
            "counter",
            "Sandboxes their idle timeout paused (on_idle: pause).",
            m.idle_pauses_total.to_string(),
        ),
        (
            "hearth_wakes_total",
            "counter",
            "Idle-paused sandboxes resumed by their next use.",
            m.wakes_total.to_string(),
        ),
        (
            "hearth_image_cache_bytes",
            "gauge",
            "Bytes of blobs and root filesystems in the image cache.",
            m.image_cache_bytes.to_string(),
        ),
        (
            "hearth_capacity_vcpus",
            "gauge",
            "vCPUs this node hands out.",
            m.capacity.vcpus.to_string(),
        ),
        (
            "hearth_capacity_memory_bytes",
            "gauge",
            "Guest memory this node hands out.",
            (m.capacity.memory_mib << 20).to_string(),
        ),
        (
            "hearth_allocated_vcpus",
            "gauge",
            "vCPUs held by creating and running sandboxes.",
            m.allocated_vcpus.to_string(),
        ),
        (
            "hearth_allocated_memory_bytes",
            "gauge",
            "Guest memory held by creating and running sandboxes.",
            (m.allocated_memory_mib << 20).to_string(),
        ),
        (
            "hearth_template_memory_bytes",
            "gauge",
            "Memory held for boot templates' memory copies (counted against capacity).",
            m.template_memory_bytes.to_string(),
        ),
        (
            "hearth_warm_pool_ready",
            "gauge",
            "Warm pool sandboxes booted and ready for a create to take (they count in allocated).",
            m.warm_ready.to_string(),
        ),
        (
            "hearth_free_vcpus",
            "gauge",
            "vCPUs still free for new sandboxes.",
            m.capacity
                .vcpus
                .saturating_sub(m.allocated_vcpus)
                .to_string(),
        ),
    ];
    for (name, kind, help, value) in simple {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let h = &m.boot_seconds;
    let _ = writeln!(
        out,
        "# HELP hearth_boot_seconds Creation until the agent answered (pull, boot slot wait, boot).\n\
         # TYPE hearth_boot_seconds histogram"
    );
    for (bound, count) in &h.buckets {
        let _ = writeln!(out, "hearth_boot_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "hearth_boot_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "hearth_boot_seconds_sum {}", h.sum);
    let _ = writeln!(out, "hearth_boot_seconds_count {}", h.count);
    out
}

/// Per-sandbox network series: one line per sandbox in each family (none when `networks` is empty).
pub fn render_networks(networks: &[SandboxNetworkStats]) -> String {
    type Value = fn(&SandboxNetworkStats) -> u64;
    let families: [(&str, &str, &str, Value); 7] = [
        (
            "hearth_sandbox_network_sent_bytes_total",
            "counter",
            "Bytes the sandbox sent to its destinations.",
            |n| n.stats.proxy.bytes_out,
        ),
        (
            "hearth_sandbox_network_received_bytes_total",
            "counter",
            "Bytes the sandbox received from its destinations.",
            |n| n.stats.proxy.bytes_in,
        ),
        (
            "hearth_sandbox_network_connections_total",
            "counter",
            "Outbound connections relayed (allowed and connected).",
            |n| n.stats.proxy.connections,
        ),
        (
            "hearth_sandbox_network_open_connections",
            "gauge",
            "Outbound connections open now.",
            |n| n.stats.proxy.active,
        ),
        (
            "hearth_sandbox_network_refused_connections_total",
            "counter",
            "Outbound connections the egress proxy refused or cut (policy, connection limit).",
            |n| n.stats.proxy.refused,
        ),
        (
            "hearth_sandbox_network_refused_dns_queries_total",
            "counter",
            "DNS queries refused (names the policy does not allow).",
            |n| n.stats.dns.refused,
        ),
        (
            "hearth_sandbox_network_dns_queries_total",
            "counter",
            "DNS queries answered.",
            |n| n.stats.dns.queries,
        ),
    ];
    let mut out = String::new();
    if networks.is_empty() {
        return out;
    }
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for n in networks {
            let _ = writeln!(
                out,
                "{name}{{sandbox=\"{}\",tenant=\"{}\"}} {}",
                label_value(&n.id),
                label_value(&n.tenant),
                value(n)
            );
        }
    }
    out
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use hearth_sandbox::node::{Capacity, Histogram, StateCounts};
    use hearth_sandbox::NetworkStats;

    use super::*;

    #[test]
    fn renders_every_family_in_prometheus_text() {
        let m = NodeMetrics {
            sandboxes: StateCounts {
                creating: 1,
                running: 2,
                paused: 4,
                stopped: 0,
                failed: 3,
            },
            boots_total: 6,
            boot_failures_total: 3,
            boot_seconds: Histogram {
                buckets: vec![(1.0, 0), (5.0, 2)],
                sum: 7.5,
                count: 3,
            },
            execs_total: 9,
            idle_pauses_total: 5,
            wakes_total: 4,
            image_cache_bytes: 1234,
            allocated_vcpus: 3,
            allocated_memory_mib: 1536,
            template_memory_bytes: 1 << 29,
            capacity: Capacity {
                vcpus: 4,
                memory_mib: 4096,
                disk_bytes: u64::MAX,
            },
            warm_ready: 2,
        };
        let text = render(&m);
        for line in [
            "hearth_sandboxes{state=\"running\"} 2",
            "hearth_sandboxes{state=\"paused\"} 4",
            "hearth_sandboxes{state=\"failed\"} 3",
            "hearth_boots_total 6",
            "hearth_boot_failures_total 3",
            "hearth_execs_total 9",
            "hearth_idle_pauses_total 5",
            "hearth_wakes_total 4",
            "hearth_image_cache_bytes 1234",
            "hearth_capacity_vcpus 4",
            "hearth_allocated_memory_bytes 1610612736",
            "hearth_template_memory_bytes 536870912",
            "hearth_boot_seconds_bucket{le=\"5\"} 2",
            "hearth_boot_seconds_bucket{le=\"+Inf\"} 3",
            "hearth_boot_seconds_sum 7.5",
            "# TYPE hearth_boot_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn renders_each_sandboxs_network_with_escaped_labels() {
        let mut stats = NetworkStats::default();
        stats.proxy.bytes_out = 10;
        stats.proxy.bytes_in = 2000;
        stats.proxy.connections = 3;
        stats.proxy.refused = 4;
        stats.dns.refused = 5;
        let networks = [SandboxNetworkStats {
            id: "sb-1".into(),
            tenant: "a\"b".into(),
            stats,
        }];
        let text = render_networks(&networks);
        for line in [
            "# TYPE hearth_sandbox_network_sent_bytes_total counter",
            "hearth_sandbox_network_sent_bytes_total{sandbox=\"sb-1\",tenant=\"a\\\"b\"} 10",
            "hearth_sandbox_network_received_bytes_total{sandbox=\"sb-1\",tenant=\"a\\\"b\"} 2000",
            "hearth_sandbox_network_connections_total{sandbox=\"sb-1\",tenant=\"a\\\"b\"} 3",
            "hearth_sandbox_network_refused_connections_total{sandbox=\"sb-1\",tenant=\"a\\\"b\"} 4",
            "hearth_sandbox_network_refused_dns_queries_total{sandbox=\"sb-1\",tenant=\"a\\\"b\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(render_networks(&[]), "");
    }
}
