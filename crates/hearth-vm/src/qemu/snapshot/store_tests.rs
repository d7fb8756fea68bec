use std::time::{Duration, SystemTime};

use super::*;
use crate::qemu::snapshot::{ensure_template, Template};
use crate::qemu::QemuVmm;
use crate::spec::{Drive, MachineRevision, VmSpec};
use crate::Accel;

const HOUR: Duration = Duration::from_secs(3600);

struct Home {
    dir: tempfile::TempDir,
    qemu: QemuVmm,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        for file in ["vmlinux", "init.cpio", "qemu"] {
            std::fs::write(dir.path().join(file), file).unwrap();
        }
        let qemu = QemuVmm::new(dir.path().join("qemu"), Accel::Tcg, Some(2_300_000)).unwrap();
        Home { dir, qemu }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spec(&self, memory_mib: u32) -> VmSpec {
        let home = self.path();
        let mut spec = VmSpec::new(
            home.join("vmlinux"),
            home.join("init.cpio"),
            home.join("run/x"),
        );
        spec.memory_mib = memory_mib;
        spec.drives = vec![Drive::rootfs(home.join("img.ext4"))];
        spec
    }

    /// A template for `spec` laid out as a finished build leaves it, last used at `used`.
    fn built(&self, spec: &VmSpec, used: SystemTime) -> Template {
        let template = Template::for_spec(&self.qemu, self.path(), spec).unwrap();
        std::fs::create_dir_all(&template.dir).unwrap();
        std::fs::write(template.memory(), b"memory").unwrap();
        std::fs::write(template.state(), b"state").unwrap();
        let meta = TemplateMeta {
            id: template.key.id.clone(),
            inputs: template.key.inputs.clone(),
            state_bytes: 5,
            build_ms: 1,
            built_unix: 0,
        };
        let path = template.dir.join(META);
        std::fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
        std::fs::File::open(&path)
            .unwrap()
            .set_modified(used)
            .unwrap();
        assert!(template.is_built());
        template
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = template_dirs(self.path())
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    }
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[test]
fn stale_and_unfinished_templates_go_and_live_ones_stay() {
    let home = Home::new();
    let now = SystemTime::now();
    let live = home.built(&home.spec(256), now - HOUR);

    // Built from a kernel that has since been replaced.
    let other_kernel = home.path().join("vmlinux-old");
    std::fs::write(&other_kernel, b"old kernel").unwrap();
    let mut spec = home.spec(256);
    spec.kernel = other_kernel.clone();
    let old_kernel = home.built(&spec, now - HOUR);
    std::fs::write(&other_kernel, b"the upgraded kernel").unwrap();

    // Made for the machine with the PIT (revision 1), before the upgrade to revision 2.
    let mut spec = home.spec(256);
    spec.machine = MachineRevision::WITH_PIT;
    let old_machine = home.built(&spec, now);

    // An older template format.
    let old_format = home.built(&home.spec(300), now);
    let mut meta = old_format.meta().unwrap();
    meta.inputs.format = FORMAT - 1;
    std::fs::write(
        old_format.dir.join(META),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();

    // A build that died half-way, and one still running (its lock held).
    let died = home.path().join("templates/00000000deadbeef");
    std::fs::create_dir_all(&died).unwrap();
    std::fs::write(died.join("state.tmp"), b"half").unwrap();
    let running = home.path().join("templates/00000000cafef00d");
    std::fs::create_dir_all(&running).unwrap();
    let lock = BuildLock::take(&super::super::lock_path(&running)).unwrap();

    let collected = make_room(home.path(), "new", 16, now).unwrap();
    let why: Vec<(String, &str)> = collected.stale.clone();
    let reason = |t: &Template| why.iter().find(|(id, _)| *id == t.key.id).map(|w| w.1);
    assert_eq!(reason(&old_kernel), Some("its kernel changed or is gone"));
    assert_eq!(
        reason(&old_machine),
        Some("made for an older machine revision")
    );
    assert_eq!(
        reason(&old_format),
        Some("made by an older template format")
    );
    assert!(why
        .iter()
        .any(|(id, why)| id == "00000000deadbeef" && why.contains("did not finish")));
    assert_eq!(collected.stale.len(), 4, "{:?}", collected.stale);
    assert!(collected.evicted.is_empty());
    assert_eq!(
        home.ids(),
        sorted(vec![live.key.id.clone(), "00000000cafef00d".into()]),
        "the live template and the running build stay"
    );
    assert!(live.is_built());
    assert!(
        !super::super::lock_path(&old_kernel.dir).exists(),
        "a removed template's lock file goes with it"
    );
    drop(lock);
}

#[test]
fn the_least_recently_used_idle_templates_make_room() {
    let home = Home::new();
    let now = SystemTime::now();
    let oldest = home.built(&home.spec(256), now - 3 * HOUR);
    let older = home.built(&home.spec(300), now - 2 * HOUR);
    let recent = home.built(&home.spec(400), now - HOUR);

    let collected = make_room(home.path(), "new", 2, now).unwrap();
    assert_eq!(
        collected.evicted,
        [oldest.key.id.clone(), older.key.id.clone()]
    );
    assert_eq!(collected.kept, 1);
    assert_eq!(home.ids(), [recent.key.id.as_str()]);

    // Under the limit already: nothing goes.
    let collected = make_room(home.path(), "new", 2, now).unwrap();
    assert_eq!(
        collected,
        Collected {
            kept: 1,
            ..Collected::default()
        }
    );
}

#[test]
fn templates_in_use_or_being_built_are_never_evicted_and_the_build_is_refused() {
    let home = Home::new();
    let now = SystemTime::now();
    let in_use = home.built(&home.spec(256), now - Duration::from_secs(60));
    let locked = home.built(&home.spec(300), now - 3 * HOUR);
    let lock = BuildLock::take(&super::super::lock_path(&locked.dir)).unwrap();

    let err = make_room(home.path(), "new", 2, now).unwrap_err();
    assert!(matches!(err, SnapshotError::Full { limit: 2, .. }), "{err}");
    assert!(
        err.to_string().contains("at most 2 boot templates"),
        "{err}"
    );
    assert_eq!(
        home.ids(),
        sorted(vec![in_use.key.id.clone(), locked.key.id.clone()])
    );

    // Once the build lock is free, the idle one goes; the one in use stays.
    drop(lock);
    let collected = make_room(home.path(), "new", 2, now).unwrap();
    assert_eq!(collected.evicted, [locked.key.id.as_str()]);
    assert_eq!(home.ids(), [in_use.key.id.as_str()]);
}

#[test]
fn a_build_over_the_limit_is_refused_before_it_boots_anything() {
    let home = Home::new();
    let qemu = home.qemu.clone().with_max_templates(1).unwrap();
    let first = home.built(&home.spec(256), SystemTime::now());
    // The template of another memory size cannot be built: the only one is in use. (A build would
    // fail anyway here, `qemu` is not QEMU; the refusal comes first.)
    let err = ensure_template(&qemu, home.path(), &home.spec(300)).unwrap_err();
    assert!(matches!(err, SnapshotError::Full { limit: 1, .. }), "{err}");
    assert_eq!(home.ids(), [first.key.id.as_str()]);
    // The existing one is still served, and marked used.
    let meta = first.dir.join(META);
    std::fs::File::open(&meta)
        .unwrap()
        .set_modified(SystemTime::now() - HOUR)
        .unwrap();
    let again = ensure_template(&qemu, home.path(), &home.spec(256)).unwrap();
    assert_eq!(again.key.id, first.key.id);
    let used = std::fs::metadata(&meta).unwrap().modified().unwrap();
    assert!(
        used.elapsed().unwrap() < Duration::from_secs(60),
        "marked used"
    );
    assert!(QemuVmm::with_max_templates(home.qemu.clone(), 0).is_err());
}

#[test]
fn marking_a_template_used_writes_at_most_once_a_minute() {
    let home = Home::new();
    let now = SystemTime::now();
    let template = home.built(&home.spec(256), now - Duration::from_secs(30));
    let meta = template.dir.join(META);
    let modified = || std::fs::metadata(&meta).unwrap().modified().unwrap();
    let before = modified();
    mark_used(&template.dir, now);
    assert_eq!(modified(), before, "used 30 s ago: left alone");
    mark_used(&template.dir, now + Duration::from_secs(60));
    assert_eq!(modified(), now + Duration::from_secs(60));
}

#[test]
fn a_lock_file_unlinked_under_a_waiter_is_not_a_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lock");
    let held = BuildLock::take(&path).unwrap();
    let waiter = {
        let path = path.clone();
        std::thread::spawn(move || {
            let _lock = BuildLock::take(&path).unwrap();
            // The lock it got is on the file now at `path`, not on the unlinked one.
            std::fs::metadata(&path).is_ok()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(&path).unwrap(); // as `remove` does, holding the lock
    drop(held);
    assert!(waiter.join().unwrap());
    assert!(BuildLock::try_take(&path).unwrap().is_some());
}

#[test]
fn a_daemon_start_removes_stale_templates_and_evicts_nothing() {
    let home = Home::new();
    let now = SystemTime::now();
    // Two live templates, long idle: over a limit of one, but only a build evicts.
    let live = home.built(&home.spec(256), now - HOUR);
    let other = home.built(&home.spec(300), now - HOUR);
    let mut spec = home.spec(320);
    spec.machine = MachineRevision::WITH_PIT;
    let old_machine = home.built(&spec, now);
    let died = home.path().join("templates/00000000deadbeef");
    std::fs::create_dir_all(&died).unwrap();

    let removed = remove_stale(home.path()).unwrap();
    assert_eq!(
        sorted(removed.iter().map(|(id, _)| id.clone()).collect()),
        sorted(vec![old_machine.key.id.clone(), "00000000deadbeef".into()])
    );
    assert_eq!(
        home.ids(),
        sorted(vec![live.key.id.clone(), other.key.id.clone()])
    );
    // Nothing under templates/ at all is no error.
    assert!(remove_stale(&home.path().join("elsewhere"))
        .unwrap()
        .is_empty());
}
