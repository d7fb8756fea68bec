//! The Firecracker backend's process handling (spawn, wait for the API, configure, InstanceStart,
//! pause/resume, stop with SendCtrlAltDel then kill, failure from the log, cleanup) against a named
//! fake of the `firecracker` binary, because this machine has no working Firecracker: the fake is
//! this test binary re-run as `fake_firecracker_process`, serving `support::fake_api` on the
//! `--api-sock` it is given. What it receives is validated against Firecracker's schema. Its
//! behaviour is chosen by the VM id (the run directory's name): `ok-*` runs until Ctrl+Alt+Del,
//! `kvmerr-*` logs a KVM internal error and exits 0 after InstanceStart, `dies-*` exits 1 at once,
//! `stubborn-*` ignores Ctrl+Alt+Del, `rejects-*` rejects the root drive.

mod support;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use hearth_vm::firecracker::{ConfigMode, FirecrackerError, FirecrackerVmm};
use hearth_vm::{Drive, RunningVm, VmError, VmSpec};
use support::fake_api::{serve_one, FakeState, Recorded};
use support::swagger::FirecrackerSchema;

/// The helper process. As a test on its own it does nothing (it is ignored by default).
#[test]
#[ignore = "the fake Firecracker process started by the other tests"]
fn fake_firecracker_process() {
    let Ok(args) = std::env::var("HEARTH_FAKE_FC_ARGS") else {
        return;
    };
    let args: Vec<&str> = args.split(' ').collect();
    let value = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].to_owned())
    };
    let api_sock = PathBuf::from(value("--api-sock").expect("--api-sock"));
    let id = value("--id").expect("--id");
    let record_path = api_sock.parent().unwrap().with_extension("record.jsonl");
    if id.starts_with("dies") {
        eprintln!("fake firecracker: opening /dev/kvm: Permission denied");
        std::process::exit(1);
    }
    let mut record = std::fs::File::create(&record_path).unwrap();
    let mut state = FakeState {
        id: id.clone(),
        reject_path: id
            .starts_with("rejects")
            .then(|| "/drives/hearth_rootfs".to_owned()),
        ..FakeState::default()
    };
    let mut log_path = None;
    if let Some(config) = value("--config-file") {
        let text = std::fs::read_to_string(&config).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        log_path = doc["logger"]["log_path"].as_str().map(PathBuf::from);
        let entry = Recorded {
            method: "CONFIG".into(),
            path: config,
            body: Some(doc),
        };
        writeln!(record, "{}", serde_json::to_string(&entry).unwrap()).unwrap();
        state.started = true;
    }
    let listener = std::os::unix::net::UnixListener::bind(&api_sock).unwrap();
    let log_line = |path: &Option<PathBuf>, line: &str| {
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(path.as_ref().unwrap())
            .unwrap();
        writeln!(log, "2026-11-28T10:00:00.000000000 [{id}:{line}").unwrap();
    };
    for stream in listener.incoming() {
        let request = serve_one(&stream.unwrap(), &mut state, |request| {
            writeln!(record, "{}", serde_json::to_string(request).unwrap()).unwrap()
        });
        if request.path == "/logger" {
            log_path = request.body.as_ref().unwrap()["log_path"]
                .as_str()
                .map(PathBuf::from);
            log_line(&log_path, "main:INFO] Running Firecracker v1.17.0-dev");
        }
        if request.is_action("InstanceStart") && id.starts_with("kvmerr") {
            log_line(
                &log_path,
                "fc_vcpu 0:ERROR] Unexpected exit reason on vcpu run: KVM_EXIT_INTERNAL_ERROR",
            );
            log_line(
                &log_path,
                "main:INFO] Firecracker exiting successfully. exit_code=0",
            );
            std::process::exit(0);
        }
        if request.is_action("SendCtrlAltDel") && !id.starts_with("stubborn") {
            log_line(&log_path, "main:INFO] Vmm is stopping.");
            std::process::exit(0);
        }
    }
}

/// A `firecracker` that re-runs this test binary as the fake; written once, before any spawn.
fn fake_binary() -> &'static Path {
    static SCRIPT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SCRIPT
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("firecracker");
            let exe = std::env::current_exe().unwrap();
            let script = format!(
                "#!/bin/sh\nHEARTH_FAKE_FC_ARGS=\"$*\" exec '{}' --exact fake_firecracker_process \
                 --ignored --nocapture --test-threads=1\n",
                exe.display()
            );
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            (dir, path)
        })
        .1
}

fn spec(home: &Path, id: &str) -> VmSpec {
    let mut spec = VmSpec::new("/k/vmlinux", "/k/initramfs", home.join(id));
    spec.drives = vec![
        Drive::rootfs("/r.ext4"),
        Drive::scratch(home.join("s.ext4")),
    ];
    spec.console_log = home.join(format!("{id}.console"));
    spec
}

fn recorded(home: &Path, id: &str) -> Vec<Recorded> {
    std::fs::read_to_string(home.join(format!("{id}.record.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn api_start_configures_runs_pauses_and_stops_with_ctrl_alt_del() {
    let schema = FirecrackerSchema::load();
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "ok-api");
    let mut vm = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .unwrap();
    let pid = vm.pid();
    assert_eq!(vm.api().instance_info().unwrap().state, "Running");
    vm.pause().unwrap();
    vm.resume().unwrap();
    let exit = vm.stop(Duration::from_secs(5)).unwrap();
    assert!(exit.status.success(), "{exit:?}");
    assert_eq!(exit.failure, None);
    assert!(!spec.run_dir.exists(), "run dir left behind");
    assert!(gone(pid), "pid {pid} still there");
    let requests = recorded(home.path(), "ok-api");
    let calls: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        calls.starts_with(&["GET /".into(), "PUT /logger".into()]),
        "{calls:?}"
    );
    assert!(requests.iter().any(|r| r.is_action("InstanceStart")));
    assert!(
        requests.last().unwrap().is_action("SendCtrlAltDel"),
        "{calls:?}"
    );
    for r in &requests {
        schema
            .validate_request(&r.method, &r.path, r.body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_kvm_internal_error_with_exit_status_zero_is_reported_as_a_failure() {
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "kvmerr-1");
    let mut vm = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("exited");
    assert!(exit.status.success(), "{exit:?}");
    let failure = exit.failure.expect("a failure from the log");
    assert!(failure.contains("KVM_EXIT_INTERNAL_ERROR"), "{failure}");
    assert!(!spec.run_dir.exists());
}

#[test]
fn an_exit_during_start_up_fails_fast_with_its_stderr_and_cleans_up() {
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "dies-1");
    let error = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .err()
        .unwrap();
    assert!(matches!(error, VmError::EarlyExit { .. }), "{error}");
    assert!(error.to_string().contains("Permission denied"), "{error}");
    assert!(!spec.run_dir.exists());
}

#[test]
fn a_guest_ignoring_ctrl_alt_del_is_killed_after_the_grace_period() {
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "stubborn-1");
    let mut vm = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .unwrap();
    let exit = vm.stop(Duration::from_millis(300)).unwrap();
    assert_eq!(exit.status.signal(), Some(libc::SIGKILL), "{exit:?}");
    assert!(!spec.run_dir.exists());
}

#[test]
fn dropping_a_running_vm_kills_it_and_removes_its_run_dir() {
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "ok-drop");
    let vm = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .unwrap();
    let pid = vm.pid();
    drop(vm);
    assert!(gone(pid) && !spec.run_dir.exists());
}

#[test]
fn a_config_file_start_hands_over_the_dry_run_file_and_sends_no_configuration_calls() {
    let schema = FirecrackerSchema::load();
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "ok-file");
    let vmm = FirecrackerVmm::new(fake_binary()).with_config_mode(ConfigMode::ConfigFile);
    let plan = hearth_vm::Vmm::dry_run(&vmm, &spec).unwrap();
    let mut vm = vmm.start_firecracker(&spec).unwrap();
    assert_eq!(vm.api().instance_info().unwrap().state, "Running");
    vm.stop(Duration::from_secs(5)).unwrap();
    let requests = recorded(home.path(), "ok-file");
    assert_eq!(requests[0].method, "CONFIG");
    assert_eq!(Path::new(&requests[0].path), plan.files[0].0);
    let from_plan: serde_json::Value = serde_json::from_str(&plan.files[0].1).unwrap();
    assert_eq!(requests[0].body.as_ref(), Some(&from_plan));
    schema.validate("FullVmConfiguration", &from_plan).unwrap();
    assert!(
        !requests
            .iter()
            .any(|r| r.method == "PUT" && r.path != "/actions"),
        "{requests:?}"
    );
}

#[test]
fn a_rejected_configuration_call_fails_start_with_the_fault_and_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let spec = spec(home.path(), "rejects-1");
    let error = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&spec)
        .err()
        .unwrap();
    assert!(
        matches!(
            error.backend_error::<FirecrackerError>(),
            Some(FirecrackerError::Config { .. })
        ),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("/drives/hearth_rootfs"), "{message}");
    assert!(message.contains("Invalid block device path"), "{message}");
    assert!(!spec.run_dir.exists());
    let requests = recorded(home.path(), "rejects-1");
    assert!(!requests.iter().any(|r| r.is_action("InstanceStart")));
}

/// A save pauses the VM and asks for a full snapshot, whose two files end up in the save
/// directory; a restore into another run directory sends, to a fresh Firecracker, only the logger,
/// the metrics, the load (paused, with the new VM's vsock socket), each drive re-pointed at the new
/// VM's file, then the resume: no boot resource, no InstanceStart. Every body is schema-valid.
#[test]
fn a_save_and_a_restore_elsewhere_follow_firecrackers_snapshot_sequence() {
    let schema = FirecrackerSchema::load();
    let home = tempfile::tempdir().unwrap();
    let vmm = FirecrackerVmm::new(fake_binary());
    let mut vm = vmm
        .start_firecracker(&spec(home.path(), "ok-saved"))
        .unwrap();
    let dir = home.path().join("snapshot");
    let saved = vm.save_state(&dir).unwrap();
    assert_eq!(saved.state, dir.join("vmstate"));
    assert_eq!(
        std::fs::read(dir.join("memory")).unwrap(),
        b"fake guest memory"
    );
    let calls = |id: &str| -> Vec<String> {
        recorded(home.path(), id)
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    };
    assert!(
        calls("ok-saved").ends_with(&["PATCH /vm".into(), "PUT /snapshot/create".into()]),
        "{:?}",
        calls("ok-saved")
    );
    assert_eq!(vm.api().instance_info().unwrap().state, "Paused");
    drop(vm);

    let mut restored = spec(home.path(), "ok-restored");
    restored.drives[1] = Drive::scratch(home.path().join("child-scratch.ext4"));
    restored.restore_from = Some(saved.state.clone());
    let vm = vmm.start_firecracker(&restored).unwrap();
    assert!(vm.restored_in().is_some());
    assert_eq!(
        calls("ok-restored"),
        [
            "GET /",
            "PUT /logger",
            "PUT /metrics",
            "PUT /snapshot/load",
            "PATCH /drives/hearth_rootfs",
            "PATCH /drives/hearth_scratch",
            "PATCH /vm",
        ]
    );
    let requests = recorded(home.path(), "ok-restored");
    let load = requests[3].body.clone().unwrap();
    assert_eq!(load["snapshot_path"], dir.join("vmstate").to_str().unwrap());
    assert_eq!(
        load["mem_backend"]["backend_path"],
        dir.join("memory").to_str().unwrap()
    );
    assert_eq!(
        load["resume_vm"], false,
        "drives are re-pointed before a vCPU runs"
    );
    assert_eq!(
        load["vsock_override"]["uds_path"],
        restored.agent_socket.to_str().unwrap()
    );
    assert_eq!(
        requests[5].body.as_ref().unwrap()["path_on_host"],
        home.path().join("child-scratch.ext4").to_str().unwrap()
    );
    assert_eq!(requests[6].body.as_ref().unwrap()["state"], "Resumed");
    assert_eq!(vm.api().instance_info().unwrap().state, "Running");
    for r in recorded(home.path(), "ok-saved").iter().chain(&requests) {
        schema
            .validate_request(&r.method, &r.path, r.body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A restore whose snapshot is missing fails with Firecracker's reason and the snapshot's name,
/// kills the VMM and leaves no run directory; the snapshot directory is not touched.
#[test]
fn a_restore_from_a_missing_snapshot_fails_naming_it_and_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("snapshot");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("vmstate"), b"state without its memory").unwrap();
    let mut restored = spec(home.path(), "ok-broken");
    restored.restore_from = Some(dir.join("vmstate"));
    let error = FirecrackerVmm::new(fake_binary())
        .start_firecracker(&restored)
        .err()
        .expect("a restore without its memory file fails");
    let text = error.to_string();
    assert!(
        text.contains("restoring the VM from") && text.contains("vmstate"),
        "{text}"
    );
    assert!(text.contains("memory: No such file"), "{text}");
    assert!(matches!(
        error.backend_error::<FirecrackerError>(),
        Some(FirecrackerError::Restore { .. })
    ));
    assert!(!restored.run_dir.exists(), "run dir left behind");
    assert_eq!(
        std::fs::read(dir.join("vmstate")).unwrap(),
        b"state without its memory"
    );
}
