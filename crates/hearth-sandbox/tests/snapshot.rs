//! Snapshot restore with real QEMU under TCG, the real kernel and agent and the test registry's
//! images: a template is built once and two sandboxes of different images are restored from it,
//! each with its own clock, entropy, hostname, root filesystem and scratch disk; the template is
//! reused; a corrupt template state is a clear error and falls back to a cold boot; nothing is left
//! running. Each test uses its own `HEARTH_HOME`, so each builds its own template.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_sandbox::{BootPlan, Purpose, Sandbox};

mod support;
use support::{config, ok, pull, sh};

/// Processes whose command line mentions `home` (QEMUs of this test, template builds included).
fn processes_using(home: &Path) -> Vec<String> {
    let needle = home.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn template_dirs(home: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(home.join("templates")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_restored_from_one_template_are_each_their_own() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let python = pull(home.path(), "python").await;
    let config = config(home.path());

    // The first sandbox builds the template (one cold boot plus a save), then restores from it.
    let first = Sandbox::create(&config, busybox.clone()).await.unwrap();
    let restore = first.timings().restore.expect("restored from the template");
    let templates = template_dirs(home.path());
    assert_eq!(templates.len(), 1, "{templates:?}");

    // The second one reuses it: restored, and quicker to its agent than a kernel boot.
    let started = Instant::now();
    let second = Sandbox::create(&config, python.clone()).await.unwrap();
    let second_boot = started.elapsed();
    assert!(second.timings().restore.is_some(), "restored");
    assert_eq!(template_dirs(home.path()), templates, "one template reused");
    eprintln!(
        "first restore {restore:?}; second sandbox ready in {second_boot:?} ({:?})",
        second.timings()
    );

    // Each has the hostname of its own sandbox (from RESUME, not the template's command line).
    for sandbox in [&first, &second] {
        let expected = format!("hearth-{}", &sandbox.id()[..12]);
        assert_eq!(ok(sandbox, "hostname").await, expected);
    }

    // A guest that rewrites most of its memory (the template's pages among them) changes only its
    // own copy: the template's memory file is byte for byte what it was, and a VM restored after it
    // still runs.
    let memory = home
        .path()
        .join("templates")
        .join(&templates[0])
        .join("memory");
    let before = std::fs::read(&memory).expect("the template's memory file");
    ok(
        &second,
        "python3 -c 'a = bytearray(b\"\\xa5\") * (160 << 20); print(len(a))'",
    )
    .await;
    assert!(
        std::fs::read(&memory).unwrap() == before,
        "a restored VM changed its template's memory"
    );
    let third = Sandbox::create(&config, busybox.clone()).await.unwrap();
    assert!(third.timings().restore.is_some());
    assert_eq!(ok(&third, "echo alive").await, "alive");
    third.destroy().await.unwrap();

    // A guest that fills all its memory is stopped by its own kernel, and its QEMU lives: a
    // restored VM costs the host its private copies only. (Pages the template never wrote used to
    // be allocated in the shared copy by the faulting VM and charged to its cgroup on top of its
    // private copy, and QEMU was killed at the cgroup's limit.)
    let (_, bomb) = sh(
        &second,
        "python3 -c 'b = [bytearray(1 << 20) for _ in range(100000)]'",
    )
    .await;
    assert!(
        !bomb.success(),
        "the guest's OOM killer ends the bomb: {bomb:?}"
    );
    assert_eq!(ok(&second, "echo alive").await, "alive");

    // Their CRNGs diverged from the template's shared state.
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (a, b) = (ok(&first, random).await, ok(&second, random).await);
    assert_eq!(a.len(), 64, "{a}");
    assert_ne!(a, b, "clones of one template must not share random output");

    // The wall clock is the host's, not the template's build time.
    for sandbox in [&first, &second] {
        let guest: i64 = ok(sandbox, "date +%s").await.parse().unwrap();
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((host - guest).abs() <= 5, "guest {guest} host {host}");
    }

    // Root filesystems are each VM's own image; the scratch disks are each VM's own.
    assert_eq!(
        ok(&first, "test -e /usr/bin/python3 && echo yes || echo no").await,
        "no"
    );
    assert_eq!(
        ok(&second, "test -e /usr/bin/python3 && echo yes || echo no").await,
        "yes"
    );
    ok(&first, "echo first > /home/marker && sync").await;
    assert_eq!(
        ok(&second, "cat /home/marker 2>/dev/null || echo absent").await,
        "absent"
    );
    assert_eq!(ok(&first, "cat /home/marker").await, "first");

    // Ensuring the template again is a lookup, not a build.
    let plan = BootPlan::prepare(&config, &busybox, "again", Purpose::DryRun).unwrap();
    let restore_plan = plan.restore.as_ref().expect("a restore is planned");
    assert!(restore_plan.template.built, "{}", plan.snapshot_note);
    let templates = plan.vmm.boot_templates().expect("QEMU has boot templates");
    let started = Instant::now();
    let (template, _) = templates
        .template_for(home.path(), &restore_plan.cold_spec, true)
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(template, restore_plan.template);

    for sandbox in [first, second] {
        let run_dir = sandbox.run_dir();
        sandbox.destroy().await.unwrap();
        assert!(!run_dir.exists(), "run directory removed");
    }
    let left = processes_using(home.path());
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_template_is_a_clear_error_and_the_sandbox_boots_cold() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let config = config(home.path());

    // Snapshots off: a cold boot is planned and no template is made.
    let mut cold = config.clone();
    cold.snapshot = false;
    let plan = BootPlan::prepare(&cold, &busybox, "cold", Purpose::DryRun).unwrap();
    assert!(plan.restore.is_none() && plan.spec.restore_from.is_none());
    assert!(plan.snapshot_note.contains("off"), "{}", plan.snapshot_note);

    let sandbox = Sandbox::create(&config, busybox.clone()).await.unwrap();
    assert!(sandbox.timings().restore.is_some());
    sandbox.discard().await.unwrap();

    // Garbage of the same size: the template still looks complete, but does not load.
    let plan = BootPlan::prepare(&config, &busybox, "corrupt", Purpose::DryRun).unwrap();
    let restore = plan.restore.as_ref().expect("a restore is planned");
    let state = restore.template.state.clone();
    let size = std::fs::metadata(&state).unwrap().len();
    std::fs::write(&state, vec![0x5a; size as usize]).unwrap();

    // Straight at the VMM: the start fails, naming the state file and QEMU's complaint.
    std::fs::create_dir_all(&plan.spec.run_dir).unwrap();
    std::fs::File::create(plan.spec.run_dir.join("scratch.ext4"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let err = match plan.vmm.start(&plan.spec) {
        Ok(_) => panic!("a corrupt state restored"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("restoring the VM from"), "{err}");
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(!plan.spec.run_dir.exists(), "failed start cleaned up");

    // A sandbox falls back to a cold boot, works, and the bad template is gone.
    let sandbox = Sandbox::create(&config, busybox.clone()).await.unwrap();
    assert!(sandbox.timings().restore.is_none(), "booted cold");
    assert_eq!(ok(&sandbox, "echo cold-ok").await, "cold-ok");
    assert_eq!(
        ok(&sandbox, "hostname").await,
        format!("hearth-{}", &sandbox.id()[..12])
    );
    assert!(!state.exists(), "the corrupt template was discarded");
    sandbox.destroy().await.unwrap();

    let left = processes_using(home.path());
    assert!(left.is_empty(), "left running: {left:?}");
}

/// A node keeps at most `max_templates` boot templates: a VM of another size while the only one is
/// in use boots cold instead of adding one (a tenant cycling through memory sizes cannot fill the
/// disk with templates); once that template has sat idle, the next build evicts it, and the VM
/// that was restored from it runs on (it maps its own copy of the memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_at_most_its_limit_of_boot_templates() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let mut config = config(home.path());
    config.max_templates = 1;

    let first = Sandbox::create(&config, busybox.clone()).await.unwrap();
    assert!(first.timings().restore.is_some(), "restored");
    let templates = template_dirs(home.path());
    assert_eq!(templates.len(), 1, "{templates:?}");

    let mut other_size = config.clone();
    other_size.memory_mib = 384;
    let cold = Sandbox::create(&other_size, busybox.clone()).await.unwrap();
    assert!(cold.timings().restore.is_none(), "booted cold, no room");
    assert_eq!(ok(&cold, "echo cold-ok").await, "cold-ok");
    assert_eq!(template_dirs(home.path()), templates, "no second template");
    cold.destroy().await.unwrap();

    // An hour later (as far as the template's last use says)... a restore from it marks it used
    // again, and it stays.
    let meta = home
        .path()
        .join("templates")
        .join(&templates[0])
        .join("meta.json");
    let an_hour_ago = || {
        std::fs::File::open(&meta)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap()
    };
    an_hour_ago();
    let again = Sandbox::create(&config, busybox.clone()).await.unwrap();
    assert!(again.timings().restore.is_some(), "restored");
    again.destroy().await.unwrap();
    let cold = Sandbox::create(&other_size, busybox.clone()).await.unwrap();
    assert!(
        cold.timings().restore.is_none(),
        "booted cold: the template was just used"
    );
    assert_eq!(template_dirs(home.path()), templates);
    cold.destroy().await.unwrap();

    // Unused for an hour, the build of the other size's template evicts it.
    an_hour_ago();
    let restored = Sandbox::create(&other_size, busybox.clone()).await.unwrap();
    assert!(restored.timings().restore.is_some(), "restored");
    let now = template_dirs(home.path());
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, templates, "the idle template made room");
    assert_eq!(ok(&first, "echo still-here").await, "still-here");
    assert_eq!(ok(&restored, "echo restored-ok").await, "restored-ok");

    first.destroy().await.unwrap();
    restored.destroy().await.unwrap();
    let left = processes_using(home.path());
    assert!(left.is_empty(), "left running: {left:?}");
}

/// Where the host has no room for a copy of a boot template's memory (the guest's size, on top of
/// the VM), the VM boots cold, and a template that does not exist yet is not built for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_for_template_memory_boots_cold_without_building_a_template() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let mut config = config(home.path());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = asked.clone();
    config.template_memory_room = hearth_sandbox::MemoryRoom::new(move |mib| {
        record.lock().unwrap().push(mib);
        None
    });
    let sandbox = Sandbox::create(&config, busybox).await.unwrap();
    assert!(sandbox.timings().restore.is_none(), "booted cold");
    assert_eq!(ok(&sandbox, "echo cold-ok").await, "cold-ok");
    assert_eq!(*asked.lock().unwrap(), [u64::from(config.memory_mib)]);
    assert!(template_dirs(home.path()).is_empty(), "no template built");
    sandbox.destroy().await.unwrap();
}
