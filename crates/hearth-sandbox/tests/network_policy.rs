//! Egress policy enforced on a real guest (QEMU under TCG, the busybox test image) against the
//! fake internet (hearth-testkit: HTTP servers and a DNS server on documentation addresses, routed
//! from the host): one sandbox, its policy changed live from `none` to `allow` to `open` and back,
//! each step checked with the guest's own `nslookup` and Python's urllib (the python test image); in
//! `open`, a neighbour sandbox's server is reached by no address, and an open connection to a
//! destination a live update newly denies is cut within 1 s; then teardown leaves no namespace,
//! mount or directory behind.

use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_net::addressing::{GATEWAY, GUEST};
use hearth_net::network::{host_addresses, NetworkOptions};
use hearth_net::policy::{Mode, NetworkPolicy};
use hearth_sandbox::{Networking, Sandbox, SandboxConfig};
use hearth_testkit::fake_internet::{FakeInternet, OTHER_WEB, WEB};
use hearth_vm::channel::{ExecHandle, ExecOutput, ExecRequest};

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

/// Starts `argv` in the guest without waiting for it.
async fn start(sandbox: &Sandbox, argv: &[&str]) -> ExecHandle {
    sandbox
        .client()
        .exec(ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin".into()],
            ..ExecRequest::default()
        })
        .await
        .unwrap()
}

/// Reads `handle`'s stdout until a line starting with `prefix`; that line.
async fn line_starting(handle: &mut ExecHandle, prefix: &str, within: Duration) -> String {
    let mut text = String::new();
    let read = async {
        loop {
            match handle.next_output().await.unwrap() {
                Some(ExecOutput::Stdout(b)) | Some(ExecOutput::Stderr(b)) => {
                    text.push_str(&String::from_utf8_lossy(&b));
                    if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
                        return line.to_owned();
                    }
                }
                None => panic!("the command ended before printing {prefix:?}: {text}"),
            }
        }
    };
    match tokio::time::timeout(within, read).await {
        Ok(line) => line,
        Err(_) => panic!("no {prefix:?} line within {within:?}"),
    }
}

/// Holds one TCP connection to `argv[1]`:80 open: the request head is never finished, so the
/// server keeps waiting; reports when the connection ends and how.
const HOLD: &str = "import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=60)
s.sendall(b'GET /held HTTP/1.1\\r\\nHost: x\\r\\n')
print('connected', flush=True)
try:
    print('ended: closed' if not s.recv(1) else 'ended: data', flush=True)
except ConnectionResetError:
    print('ended: reset', flush=True)
except socket.timeout:
    print('ended: still open after 60 s', flush=True)
";

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
    let sandbox = Sandbox::create(&config, image.clone()).await.unwrap();
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

    // The attack: an open sandbox reaching a neighbour's server. Every sandbox has the same link
    // addresses in its own namespace and nothing routes between namespaces, so the neighbour's
    // address is the guest's own (nothing listens there) and the gateway refuses; neither
    // reaches the neighbour's server, which answers on its own side.
    let neighbour = Sandbox::create(&config, image).await.unwrap();
    let _server = start(
        &neighbour,
        &["python3", "-m", "http.server", "9000", "--bind", "0.0.0.0"],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetch(&neighbour, &format!("http://{GUEST}:9000/"), "")
        .await
        .0
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the neighbour's server never answered on its own side"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for address in [GUEST, GATEWAY] {
        let (page, took) = fetch(&sandbox, &format!("http://{address}:9000/"), "").await;
        assert!(
            page.is_err() && took < REFUSED_AT_ONCE,
            "the neighbour's server at {address}:9000: {page:?} in {took:?}"
        );
    }
    neighbour.destroy().await.unwrap();

    // A live update cuts an open connection to a destination it newly denies, within 1 s (the
    // attack: keep a connection opened while allowed and go on using it after the deny).
    let mut held = start(&sandbox, &["python3", "-c", HOLD, &OTHER_WEB.to_string()]).await;
    line_starting(&mut held, "connected", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandbox.network_activity().unwrap().0.proxy.active == 0 {
        // The proxy relays once it has waited for the head's server name (its peek timeout).
        assert!(
            Instant::now() < deadline,
            "the held connection was never relayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let denied = Instant::now();
    sandbox
        .set_network_policy(policy(Mode::Open, &[], &[&OTHER_WEB.to_string()]))
        .unwrap();
    let ended = line_starting(&mut held, "ended", Duration::from_secs(5)).await;
    let took = denied.elapsed();
    assert!(
        ended == "ended: reset" || ended == "ended: closed",
        "{ended}"
    );
    assert!(took < Duration::from_secs(1), "cut after {took:?}");
    eprintln!("open connection cut {took:?} after the deny");

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
