//! Every request body and config file the Firecracker backend produces validates against
//! Firecracker's own API description; deliberately broken bodies do not.

mod support;

use hearth_vm::firecracker::config::{ActionType, ApiRequest, RunState};
use hearth_vm::firecracker::{
    ConfigMode, FirecrackerVmm, JailerConfig, RateLimiter, TokenBucket, VmConfig,
};
use hearth_vm::{Drive, NetworkInterface, VmSpec, Vmm, SCRATCH_SERIAL};
use serde_json::{json, Value};
use support::swagger::FirecrackerSchema;

fn spec() -> VmSpec {
    let mut spec = VmSpec::new(
        "/var/lib/hearth/kernel/vmlinux",
        "/var/lib/hearth/initramfs.cpio",
        "/var/lib/hearth/run/sb1",
    );
    spec.vcpus = 2;
    spec.memory_mib = 1024;
    spec.drives = vec![
        Drive::rootfs("/var/lib/hearth/rootfs/sha256-abc.ext4"),
        Drive::scratch("/var/lib/hearth/run/sb1/scratch.ext4"),
    ];
    spec.network = Some(NetworkInterface {
        tap: "hearth-tap0".into(),
        mac: "06:00:ac:10:00:02".into(),
        netns: None,
    });
    spec
}

/// The backend variants whose output must all be valid: plain, jailed, rate-limited, both modes.
fn backends() -> Vec<(&'static str, FirecrackerVmm)> {
    let limiter = RateLimiter {
        bandwidth: Some(TokenBucket {
            size: 50 << 20,
            one_time_burst: Some(100 << 20),
            refill_time: 1000,
        }),
        ops: Some(TokenBucket {
            size: 1000,
            one_time_burst: None,
            refill_time: 1000,
        }),
    };
    let fc = || FirecrackerVmm::new("/usr/local/bin/firecracker");
    vec![
        ("plain api", fc()),
        ("config file", fc().with_config_mode(ConfigMode::ConfigFile)),
        (
            "jailed",
            fc().with_jailer(JailerConfig::new("/usr/local/bin/jailer", 1000, 1000)),
        ),
        (
            "rate-limited",
            fc().with_rate_limiter(SCRATCH_SERIAL, limiter),
        ),
    ]
}

/// Every call the backend makes: configuration, InstanceStart, stop, pause/resume, state query,
/// a save's snapshot and a restore's load and drive updates.
fn all_requests(config: &VmConfig) -> Vec<ApiRequest> {
    let mut requests = config.requests();
    requests.extend(config.restore_requests("/h/paused/vmstate", "/h/paused/memory"));
    requests.extend([
        ApiRequest::snapshot_create("/h/run/vm1/vmstate", "/h/run/vm1/memory"),
        ApiRequest::action(ActionType::InstanceStart),
        ApiRequest::action(ActionType::SendCtrlAltDel),
        ApiRequest::action(ActionType::FlushMetrics),
        ApiRequest::vm_state(RunState::Paused),
        ApiRequest::vm_state(RunState::Resumed),
        ApiRequest::get("/"),
    ]);
    requests
}

#[test]
fn every_api_request_body_validates_against_firecrackers_schema() {
    let schema = FirecrackerSchema::load();
    for (variant, vmm) in backends() {
        let config = vmm.vm_config(&spec()).unwrap();
        let requests = all_requests(&config);
        // Each resource the backend configures is among them, so none escapes validation.
        for path in [
            "/logger",
            "/metrics",
            "/machine-config",
            "/boot-source",
            "/vsock",
            "/network-interfaces/eth0",
            "/snapshot/create",
            "/snapshot/load",
        ] {
            assert!(
                requests.iter().any(|r| r.path == path),
                "{variant}: no {path}"
            );
        }
        assert_eq!(
            requests
                .iter()
                .filter(|r| r.path.starts_with("/drives/"))
                .count(),
            4,
            "two drives configured, and re-pointed after a restore"
        );
        for request in &requests {
            schema
                .validate_request(request.method, &request.path, request.body.as_ref())
                .unwrap_or_else(|e| panic!("{variant}: {e}"));
        }
    }
}

#[test]
fn the_config_file_and_each_of_its_sections_validate() {
    let schema = FirecrackerSchema::load();
    for (variant, vmm) in backends() {
        let plan = vmm.dry_run(&spec()).unwrap();
        let (path, text) = &plan.files[0];
        assert!(
            path.ends_with("vm_config.json"),
            "{variant}: {}",
            path.display()
        );
        let doc: Value = serde_json::from_str(text).unwrap();
        schema
            .validate("FullVmConfiguration", &doc)
            .unwrap_or_else(|e| panic!("{variant}: config file:\n{e}\n{text}"));
        for (section, value) in doc.as_object().unwrap() {
            let section_schema = schema
                .property_schema("FullVmConfiguration", section)
                .unwrap_or_else(|| panic!("{variant}: {section} is not a config-file section"));
            let errors: Vec<String> = schema
                .validator(section_schema)
                .iter_errors(value)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{variant}: {section}: {errors:?}");
        }
    }
}

#[test]
fn every_definition_in_the_schema_converts_to_a_working_validator() {
    let schema = FirecrackerSchema::load();
    let names = schema.definition_names();
    assert!(names.len() > 40, "{names:?}");
    for name in names {
        // Compiling is the check: an unresolvable $ref or a Swagger-only construct fails here.
        let _ = schema.validator(&json!({ "$ref": format!("#/definitions/{name}") }));
    }
}

#[test]
fn broken_bodies_are_rejected_by_the_same_validator() {
    let schema = FirecrackerSchema::load();
    let config = FirecrackerVmm::new("fc").vm_config(&spec()).unwrap();
    let machine = serde_json::to_value(&config.machine_config).unwrap();
    let drive = serde_json::to_value(&config.drives[0]).unwrap();
    schema.validate("MachineConfiguration", &machine).unwrap();
    schema.validate("Drive", &drive).unwrap();

    let mut vcpus_as_string = machine.clone();
    vcpus_as_string["vcpu_count"] = json!("2");
    let mut too_many_vcpus = machine.clone();
    too_many_vcpus["vcpu_count"] = json!(64);
    let mut misspelt = machine.clone();
    misspelt["mem_size_mb"] = json!(512);
    let mut no_drive_id = drive.clone();
    no_drive_id.as_object_mut().unwrap().remove("drive_id");
    let mut bad_engine = drive.clone();
    bad_engine["io_engine"] = json!("Threaded");
    for (what, definition, body) in [
        (
            "vcpu_count as a string",
            "MachineConfiguration",
            &vcpus_as_string,
        ),
        ("64 vCPUs", "MachineConfiguration", &too_many_vcpus),
        ("an unknown field", "MachineConfiguration", &misspelt),
        ("a drive without drive_id", "Drive", &no_drive_id),
        ("an unknown io_engine", "Drive", &bad_engine),
    ] {
        assert!(
            schema.validate(definition, body).is_err(),
            "{what} was accepted: {body}"
        );
    }
    assert!(schema
        .validate_request("PUT", "/actions", Some(&json!({"action_type": "Reboot"})))
        .is_err());
    assert!(schema
        .validate_request("PUT", "/drive/rootfs", Some(&drive))
        .is_err());
    assert!(schema
        .validate_request("PUT", "/boot-source", None)
        .is_err());
}
