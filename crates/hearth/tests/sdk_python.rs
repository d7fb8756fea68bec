//! The Python SDK (`sdk/python`) end to end: `pip install` of the package from the tree (into a
//! temp target, no PyPI: dependencies and the build backend come from the suite's venv,
//! `scripts/python-env.sh`), `mypy --strict` over its sources and tests, then its pytest suite
//! against a real `hearth serve` with real VMs (TCG). The pytest suite boots four sandboxes: one
//! shared by most checks, one deleted by its `async with` block (whose tenant's quota of one
//! refuses a second), one of the python image for `run_code` (busybox has no python3), and one
//! `hearth.run` one-shot; and forks' children (of the shared one, and of the python one, to show
//! its interpreter copied).

#[path = "serve/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;

use daemon::{image, Daemon, Home, ALICE};
use reqwest::Method;

const CAROL: &str = "carol-token-0003";

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"

[[tenants]]
name = "carol"
token = "carol-token-0003"
quota = { sandboxes = 1 }
"#;

/// The suite's Python venv (created or updated from `scripts/test-requirements.txt`).
fn venv(repo: &Path) -> PathBuf {
    let out = Command::new(repo.join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs `cmd`, failing the test with its output unless it succeeds; returns its stdout.
fn check(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{what}: ok\n{stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_installs_type_checks_and_drives_a_real_daemon() {
    let repo = hearth_testkit::repo_root();
    let sdk = repo.join("sdk/python");
    let venv = venv(&repo);
    let python = venv.join("bin/python");
    let scratch = tempfile::tempdir().unwrap();
    let site = scratch.path().join("site");

    // What a user does: `pip install ./sdk/python` (here offline, into a directory of its own).
    check(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args([
                "--no-index",
                "--no-deps",
                "--no-build-isolation",
                "--target",
            ])
            .arg(&site)
            .arg(&sdk),
        "pip install ./sdk/python",
    );
    let imported = check(
        Command::new(&python)
            .args(["-c", "import hearth; print(hearth.__file__)"])
            .env("PYTHONPATH", &site)
            .current_dir(scratch.path()),
        "import hearth",
    );
    assert!(
        imported.trim().starts_with(&*site.to_string_lossy()),
        "hearth imported from {imported}, not from the installed package"
    );
    assert!(
        site.join("hearth/py.typed").exists(),
        "the installed package has no py.typed"
    );
    // The package and its tests (which use its overloads as a user would).
    check(
        Command::new(venv.join("bin/mypy"))
            .args(["--strict", "--cache-dir"])
            .arg(scratch.path().join("mypy-cache"))
            .args(["src/hearth", "tests"])
            .env("MYPYPATH", sdk.join("src"))
            .current_dir(&sdk),
        "mypy --strict sdk/python/src/hearth sdk/python/tests",
    );

    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &["--capacity-cpus", "4"]);
    let pytest = Command::new(&python)
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"])
        .arg(sdk.join("tests"))
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("HEARTH_HOST", &d.url)
        .env("HEARTH_TOKEN", ALICE)
        .env("HEARTH_TEST_QUOTA_TOKEN", CAROL)
        .env("HEARTH_TEST_IMAGE", image("busybox"))
        // `run_code` needs python3, which the busybox image lacks (tests/test_code.py).
        .env("HEARTH_TEST_PYTHON_IMAGE", image("python"))
        .current_dir(&sdk)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&pytest.stdout),
        String::from_utf8_lossy(&pytest.stderr)
    );
    eprintln!("{report}");
    assert!(
        pytest.status.success(),
        "the SDK's pytest suite failed:\n{report}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(
        !report.contains(" skipped"),
        "no SDK test may skip here:\n{report}"
    );

    // The SDK's `with` blocks deleted what they created.
    for token in [ALICE, CAROL] {
        let (status, list) = d
            .json(Method::GET, "/v1/sandboxes", Some(token), None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            list["sandboxes"],
            serde_json::json!([]),
            "sandboxes left behind"
        );
    }
}
