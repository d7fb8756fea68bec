//! Egress policy enforced on a real guest (QEMU under TCG, the busybox test image) against the
//! fake internet (hearth-testkit: HTTP servers and a DNS server on documentation addresses, routed
//! from the host): one sandbox, its policy changed live from `none` to `allow` to `open` and back,
//! each step checked with the guest's own `nslookup` and Python's urllib (the python test image); then teardown leaves no
//! namespace, mount or directory behind.

use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_net::network::{host_addresses, NetworkOptions};
use hearth_net::policy::{Mode, NetworkPolicy};
use hearth_sandbox::{Networking, Sandbox, SandboxConfig};
use hearth_testkit::fake_internet::{FakeInternet, OTHER_WEB, WEB};
use hearth_vm::channel::ExecRequest;

/// `argv` in the guest: (stdout and stderr, exit code, how long it took).
async fn run(sandbox: &Sandbox, argv: &[&str]) -> (String, i32, Duration) {
    let started = Instant::now();
    let out = sandbox
        .client()
        .exec(ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin".into()],
            ..ExecRequest::default()
        })
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let code = out
        .status
        .code
        .unwrap_or(128 + out.status.signal.unwrap_or(0));
    (text, code, started.elapsed())
}

async fn sh(sandbox: &Sandbox, script: &str) -> (String, i32, Duration) {
    run(sandbox, &["sh", "-c", script]).await
}

/// A refused connection fails within this, measured in the guest (under TCG); a destination that
/// dropped packets instead would take the client's 5 s timeout.
const REFUSED_AT_ONCE: Duration = Duration::from_secs(1);

fn policy(mode: Mode, allow: &[&str], deny: &[&str]) -> NetworkPolicy {
    let parse = |l: &[&str]| l.iter().map(|e| e.parse().unwrap()).collect();
    NetworkPolicy::new(mode, parse(allow), parse(deny)).unwrap()
}

/// GETs `url` with Python's urllib, with a `Host` header when `host` is not empty: (the page,
/// or Err with the error, and how long the request took to fail, measured in the guest).
async fn fetch(sandbox: &Sandbox, url: &str, host: &str) -> (Result<String, String>, Duration) {
    const GET: &str = "import sys, time, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    req.add_header('Host', sys.argv[2])
started = time.monotonic()
try:
    print(urllib.request.urlopen(req, timeout=5).read().decode())
except Exception as e:
    print(f'ERROR after {time.monotonic() - started:.3f} s: {e}')
    sys.exit(1)
";
    let (out, code, _) = run(sandbox, &["python3", "-c", GET, url, host]).await;
    let took = out
        .strip_prefix("ERROR after ")
        .and_then(|rest| rest.split(' ').next()?.parse::<f64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs_f64);
    ((if code == 0 { Ok(out) } else { Err(out) }), took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_is_enforced_on_a_real_guest_and_changes_live() {
    let internet = FakeInternet::start().unwrap();
    let home = tempfile::tempdir().unwrap();
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home.path())
        .unwrap()
        .ensure(&hearth_testkit::image_ref("python").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home.path());
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    let mut options = NetworkOptions::for_host(Some(internet.dns_server())).unwrap();
    options.host_addrs = host_addresses().unwrap();
    config.network = Some(Networking {
        options,
        home: home.path().to_owned(),
    });
    let sandbox = Sandbox::create(&config, image).await.unwrap();
    let netns = home.path().join("net").join(sandbox.id()).join("netns");
    assert!(netns.exists(), "the sandbox has its own namespace");

    // none (the default): no name resolves, nothing connects, and both fail at once.
    let (out, code, took) = sh(&sandbox, "nslookup allowed.example 2>&1").await;
    assert!(
        code != 0 && took < Duration::from_secs(3),
        "{out} in {took:?}"
    );
    let (page, took) = fetch(&sandbox, &format!("http://{WEB}/"), "").await;
    assert!(
        page.is_err() && took < REFUSED_AT_ONCE,
        "{page:?} in {took:?}"
    );

    // allow by name: that name resolves and its server answers; another name does not resolve;
    // the other name's address, reached directly, is refused; a disallowed Host header on the
    // allowed address is refused; deny beats allow.
    sandbox
        .set_network_policy(policy(
            Mode::Allow,
            &["allowed.example", "*.wild.example"],
            &["denied.wild.example"],
        ))
        .unwrap();
    let (page, _) = fetch(&sandbox, "http://allowed.example/hello", "").await;
    let Ok(page) = page else {
        let (diag, _, _) = sh(
            &sandbox,
            "cat /etc/resolv.conf; nslookup allowed.example 2>&1; \
             wget -T 5 -O - http://allowed.example/hello 2>&1; ip route; ip addr",
        )
        .await;
        panic!(
            "the allowed name's page: {page:?}\n{diag}\n{:?}",
            sandbox.network_activity()
        );
    };
    assert!(page.contains("host=allowed.example"), "{page}");
    assert!(page.contains("path=/hello"), "{page}");
    let (out, code, _) = sh(&sandbox, "nslookup other.example 2>&1").await;
    assert!(code != 0, "a name not allowed resolved: {out}");
    let (page, took) = fetch(&sandbox, &format!("http://{OTHER_WEB}/"), "").await;
    assert!(
        page.is_err() && took < REFUSED_AT_ONCE,
        "{page:?} in {took:?}"
    );
    let (page, _) = fetch(&sandbox, "http://allowed.example/", "other.example").await;
    assert!(page.is_err(), "a disallowed Host got through: {page:?}");
    let (page, _) = fetch(&sandbox, "http://denied.wild.example/", "").await;
    assert!(page.is_err(), "deny lost to a wildcard allow: {page:?}");

    // open: the internet, but never the host, link-local/metadata or private ranges.
    sandbox
        .set_network_policy(policy(Mode::Open, &[], &[]))
        .unwrap();
    let (page, _) = fetch(&sandbox, &format!("http://{OTHER_WEB}/"), "").await;
    assert!(page.expect("open reaches the internet").contains("host="));
    for blocked in [
        "169.254.169.254",
        "10.0.0.1",
        "127.0.0.1",
        "100.96.0.1:8080",
    ] {
        let (page, took) = fetch(&sandbox, &format!("http://{blocked}/"), "").await;
        assert!(
            page.is_err() && took < REFUSED_AT_ONCE,
            "{blocked}: {page:?}"
        );
    }
    let host = host_addresses()
        .unwrap()
        .into_iter()
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .unwrap();
    let (page, _) = fetch(&sandbox, &format!("http://{host}/"), "").await;
    assert!(
        page.is_err(),
        "the host's own address {host} was reachable: {page:?}"
    );

    // And back to none, in force at once.
    let changed = Instant::now();
    sandbox.set_network_policy(NetworkPolicy::none()).unwrap();
    let (page, _) = fetch(&sandbox, &format!("http://{OTHER_WEB}/"), "").await;
    assert!(page.is_err(), "none after open still connects: {page:?}");
    eprintln!(
        "policy change to none enforced within {:?}",
        changed.elapsed()
    );
    let (stats, refused) = sandbox.network_activity().unwrap();
    assert!(
        stats.proxy.connections >= 2 && stats.proxy.bytes_in > 0,
        "{stats:?}"
    );
    assert!(
        !refused.is_empty(),
        "refused attempts are kept for the operator"
    );

    sandbox.destroy().await.unwrap();
    assert!(!netns.exists(), "the namespace is gone with the sandbox");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&home.path().display().to_string()),
        "a mount under the home is left"
    );
}
