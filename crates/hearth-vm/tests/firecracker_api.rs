//! The REST client against `support::fake_api`, a Unix-socket HTTP peer that answers like Firecracker
//! (a named fake for a binary this machine cannot run): every body it records is validated against
//! Firecracker's own schema, and its own `InstanceInfo` answers too.

mod support;

use std::path::Path;

use hearth_vm::firecracker::config::RunState;
use hearth_vm::firecracker::{ApiError, FirecrackerApi, FirecrackerVmm};
use hearth_vm::{Drive, VmSpec};
use serde_json::json;
use support::fake_api::{instance_info, spawn_fake};
use support::swagger::FirecrackerSchema;

fn spec(run_dir: &Path) -> VmSpec {
    let mut spec = VmSpec::new("/k/vmlinux", "/k/initramfs", run_dir);
    spec.drives = vec![
        Drive::rootfs("/r.ext4"),
        Drive::scratch(run_dir.join("s.ext4")),
    ];
    spec
}

#[test]
fn configure_start_query_and_stop_send_schema_valid_requests() {
    let schema = FirecrackerSchema::load();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let log = spawn_fake(&socket, None);
    let api = FirecrackerApi::new(&socket);
    let config = FirecrackerVmm::new("fc")
        .vm_config(&spec(dir.path()))
        .unwrap();

    assert_eq!(api.instance_info().unwrap().state, "Not started");
    api.configure(&config).unwrap();
    api.instance_start().unwrap();
    let info = api.instance_info().unwrap();
    assert_eq!((info.id.as_str(), info.state.as_str()), ("sb1", "Running"));
    api.set_state(RunState::Paused).unwrap();
    api.set_state(RunState::Resumed).unwrap();
    api.send_ctrl_alt_del().unwrap();

    let recorded = log.lock().unwrap().clone();
    let calls: Vec<String> = recorded
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [
            "GET /",
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/hearth_rootfs",
            "PUT /drives/hearth_scratch",
            "PUT /vsock",
            "PUT /actions",
            "GET /",
            "PATCH /vm",
            "PATCH /vm",
            "PUT /actions",
        ]
    );
    for request in &recorded {
        schema
            .validate_request(&request.method, &request.path, request.body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(recorded[5].body.as_ref().unwrap()["is_read_only"], true);
    assert_eq!(
        recorded[12].body,
        Some(json!({"action_type": "SendCtrlAltDel"}))
    );
    // The fake's own answers are Firecracker's shape too.
    for started in [false, true] {
        schema
            .validate("InstanceInfo", &instance_info("sb1", started))
            .unwrap();
    }
}

#[test]
fn a_rejected_call_reports_firecrackers_fault_message_and_stops_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let log = spawn_fake(&socket, Some("/drives/hearth_rootfs"));
    let config = FirecrackerVmm::new("fc")
        .vm_config(&spec(dir.path()))
        .unwrap();
    let error = FirecrackerApi::new(&socket).configure(&config).unwrap_err();
    match &error {
        ApiError::Rejected {
            status,
            fault,
            path,
            ..
        } => {
            assert_eq!((*status, path.as_str()), (400, "/drives/hearth_rootfs"));
            assert_eq!(fault, "Invalid block device path");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(
        error.to_string().contains("Invalid block device path"),
        "{error}"
    );
    let paths: Vec<String> = log.lock().unwrap().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths.last().map(String::as_str),
        Some("/drives/hearth_rootfs")
    );
    assert!(!paths.iter().any(|p| p == "/vsock"), "{paths:?}");
}

#[test]
fn an_absent_socket_is_a_connect_error_naming_it() {
    let error = FirecrackerApi::new("/nonexistent/fc.sock")
        .instance_info()
        .unwrap_err();
    assert!(matches!(error, ApiError::Connect { .. }), "{error:?}");
    assert!(
        error.to_string().contains("/nonexistent/fc.sock"),
        "{error}"
    );
}
