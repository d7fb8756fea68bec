//! Docker credential helpers (issue #12, item 2), run as `docker` runs them: `credHelpers` per
//! host, else `credsStore`, with `docker-credential-NAME get` reading the server on stdin. The
//! helpers here are small shell scripts speaking the helpers' protocol (the real ones need a
//! desktop keyring or gpg); the registries are small servers on 127.0.0.1 that demand Basic auth
//! and record what they receive, and, as root, the real test registry behind an auth proxy.
//! - A tenant's registry gets nothing from a store that holds credentials for another host: the
//!   helper is asked for the tenant's host only.
//! - A helper that hangs or floods its output is killed within its bounds and the pull goes on
//!   without credentials (a clear "denied" error).
//!
//! Each test sets `DOCKER_CONFIG` and `PATH` for its process (nextest runs one test per process).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::hostile::{
    authorizations, basic_challenge, plain_http_opts as opts, pull_err, Hostile,
};
use common::proxy::{Auth, FaultProxy};
use hearth_image::ImageStore;

/// How long a refused pull here may take (the hanging helper's 5 s included).
const WITHIN: Duration = Duration::from_secs(20);

/// A Docker config in a fresh directory with `config` as its `config.json`, and helper scripts
/// `docker-credential-NAME` (from `helpers`) on `PATH` ahead of everything else.
fn docker_config(config: serde_json::Value, helpers: &[(&str, String)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    for (name, body) in helpers {
        let path = dir.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::env::set_var("DOCKER_CONFIG", dir.path());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.path().to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
    dir
}

/// A helper holding `user:s3cret` for `server` only, logging every server it is asked for to
/// `log` (one per line).
fn store_for(server: &str, user: &str, log: &Path) -> String {
    format!(
        r#"read -r server || true
echo "$server" >> {log}
if [ "$server" = "{server}" ]; then
  printf '{{"ServerURL":"%s","Username":"{user}","Secret":"s3cret"}}' "$server"
else
  echo "credentials not found in native keychain"; exit 1
fi"#,
        log = log.display()
    )
}

fn basic(user: &str) -> String {
    let raw = format!("{user}:s3cret");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Attack: the operator's credential store (`credsStore`, asked for every host) holds a login for
/// its registry; a tenant names its own registry, which challenges for Basic credentials. The
/// store is asked for the tenant's host, has nothing for it, and the tenant's registry gets no
/// `Authorization` at all. The operator's registry, through its `credHelpers` entry, does get
/// the helper's credentials (so the check can fail).
#[tokio::test]
async fn a_credential_store_is_asked_only_for_the_host_a_pull_goes_to() {
    let operator = Hostile::start(basic_challenge).await;
    let tenant = Hostile::start(basic_challenge).await;
    let logs = tempfile::tempdir().unwrap();
    let (store_log, helper_log) = (logs.path().join("store"), logs.path().join("helper"));
    let _config = docker_config(
        serde_json::json!({
            "credsStore": "store",
            "credHelpers": {operator.addr.clone(): "perhost"},
            "auths": {operator.addr.clone(): {}},
        }),
        &[
            ("store", store_for(&operator.addr, "store-user", &store_log)),
            (
                "perhost",
                store_for(&operator.addr, "helper-user", &helper_log),
            ),
        ],
    );
    let o = opts(&[&operator.addr, &tenant.addr]);

    let err = pull_err(&format!("{}/x/y:latest", tenant.addr), &o, WITHIN).await;
    assert!(err.contains("denied"), "{err}");
    assert!(!tenant.seen().is_empty());
    assert_eq!(authorizations(&tenant.seen()), Vec::<String>::new());
    assert_eq!(
        lines(&store_log),
        std::slice::from_ref(&tenant.addr),
        "what the store was asked"
    );

    // The operator's registry: its own helper (not the store) answers, and its login is sent.
    pull_err(&format!("{}/x/y:latest", operator.addr), &o, WITHIN).await;
    assert!(
        authorizations(&operator.seen()).contains(&basic("helper-user")),
        "{:?}",
        authorizations(&operator.seen())
    );
    assert_eq!(lines(&helper_log), std::slice::from_ref(&operator.addr));
    assert_eq!(lines(&store_log).len(), 1, "the store was not asked again");
}

/// The process whose pid a helper wrote to `pid_file` has gone (or is a zombie awaiting reaping).
fn gone(pid_file: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(pid_file) else {
        return false;
    };
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Attack (by whoever controls the helper's backend): a helper that never answers, and one that
/// prints without end. Each is killed within its bound ([5 s, 64 KiB]), and the pull goes on
/// without credentials to a clear "denied".
#[tokio::test]
async fn a_hanging_or_flooding_helper_is_killed_and_the_pull_fails_clearly() {
    let registry = Hostile::start(basic_challenge).await;
    let dir = tempfile::tempdir().unwrap();
    let (hang_pid, flood_pid): (PathBuf, PathBuf) =
        (dir.path().join("hang.pid"), dir.path().join("flood.pid"));
    let _config = docker_config(
        serde_json::json!({"credsStore": "hang"}),
        &[
            (
                "hang",
                format!("echo $$ > {}; exec sleep 600", hang_pid.display()),
            ),
            (
                "flood",
                format!("echo $$ > {}; exec cat /dev/zero", flood_pid.display()),
            ),
        ],
    );
    let reference = format!("{}/x/y:latest", registry.addr);
    let o = opts(&[&registry.addr]);
    let t0 = Instant::now();
    let err = pull_err(&reference, &o, WITHIN).await;
    let took = t0.elapsed();
    assert!(err.contains("denied"), "{err}");
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(15)).contains(&took),
        "the hanging helper held the pull {took:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(gone(&hang_pid), "the hanging helper still runs");

    let _config = docker_config(serde_json::json!({"credsStore": "flood"}), &[]);
    // The helper scripts live in the first config's directory, still on PATH.
    let t0 = Instant::now();
    let err = pull_err(&reference, &o, WITHIN).await;
    assert!(err.contains("denied"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    assert!(gone(&flood_pid), "the flooding helper still runs");
    assert_eq!(authorizations(&registry.seen()), Vec::<String>::new());
}

/// The whole path against the real test registry behind a Basic-auth proxy: the login comes
/// from the host's credential helper and the image is pulled and built.
#[tokio::test]
async fn a_real_registry_is_pulled_with_a_helpers_login() {
    if common::skip_unless_root() {
        return;
    }
    let proxy = FaultProxy::start(&common::registry_addr()).await;
    proxy.auth(Auth::Basic {
        user: "helper-user".into(),
        pass: "s3cret".into(),
    });
    let log = tempfile::tempdir().unwrap();
    let _config = docker_config(
        serde_json::json!({"credHelpers": {proxy.addr.clone(): "perhost"}}),
        &[(
            "perhost",
            store_for(&proxy.addr, "helper-user", &log.path().join("asked")),
        )],
    );
    let home = tempfile::tempdir().unwrap();
    let image = ImageStore::open(home.path())
        .unwrap()
        .ensure(
            &format!("{}/hearth-test/busybox:latest", proxy.addr),
            &opts(&[&proxy.addr]),
        )
        .await
        .expect("pulled with the helper's login");
    assert!(image.rootfs.exists());
}
