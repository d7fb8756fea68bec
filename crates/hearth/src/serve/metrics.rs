//! `GET /metrics`: the node's counters in the Prometheus text format (version 0.0.4). Not
//! authenticated: it holds aggregate numbers only (no tenant names, sandbox ids or images), so a
//! scraper needs no token. Rendering is a pure function of a [`NodeMetrics`] snapshot.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use hearth_sandbox::node::{NodeMetrics, State as NodeState};

use super::AppState;

#[utoipa::path(get, path = "/metrics", tag = "node",
    responses((status = 200, description = "Prometheus text format: hearth_sandboxes{state}, hearth_boots_total, \
        hearth_boot_failures_total, hearth_boot_seconds (histogram), hearth_execs_total, hearth_image_cache_bytes, \
        hearth_capacity_vcpus, hearth_capacity_memory_bytes, hearth_allocated_vcpus, hearth_allocated_memory_bytes",
        content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let node = state.node.clone();
    // The snapshot may read the image cache's size from disk: keep it off the async workers.
    let snapshot = tokio::task::spawn_blocking(move || node.metrics())
        .await
        .expect("metrics task");
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&snapshot),
    )
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
        NodeState::Stopped,
        NodeState::Failed,
    ] {
        let count = m.sandboxes.get(state);
        let _ = writeln!(out, "hearth_sandboxes{{state=\"{state}\"}} {count}");
    }
    let simple: [(&str, &str, &str, String); 9] = [
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

#[cfg(test)]
mod tests {
    use hearth_sandbox::node::{Capacity, Histogram, StateCounts};

    use super::*;

    #[test]
    fn renders_every_family_in_prometheus_text() {
        let m = NodeMetrics {
            sandboxes: StateCounts {
                creating: 1,
                running: 2,
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
            image_cache_bytes: 1234,
            allocated_vcpus: 3,
            allocated_memory_mib: 1536,
            capacity: Capacity {
                vcpus: 4,
                memory_mib: 4096,
                disk_bytes: u64::MAX,
            },
        };
        let text = render(&m);
        for line in [
            "hearth_sandboxes{state=\"running\"} 2",
            "hearth_sandboxes{state=\"failed\"} 3",
            "hearth_boots_total 6",
            "hearth_boot_failures_total 3",
            "hearth_execs_total 9",
            "hearth_image_cache_bytes 1234",
            "hearth_capacity_vcpus 4",
            "hearth_allocated_memory_bytes 1610612736",
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
}
