//! The measurements behind `bench/network.sh` (run it, not this, directly):
//!
//! 1. set-up cost of one sandbox network (namespace, tap, nftables table, resolver and proxy
//!    sockets) and its teardown, no VM: p50/p99 over 30;
//! 2. policy update latency (the call returns once the firewall enforces the new rules; resolver
//!    and proxy switch before it returns): p50/p99 over 50 alternating updates;
//! 3. one real guest (QEMU/TCG, the python test image), A/B in the same VM: request latency
//!    (connect, GET 1 byte, read to the end; 30 times) and a 32 MiB download, first through the
//!    policy path (nftables redirect, the egress proxy, out to a server in the fake internet), then
//!    with the policy machinery removed from the sandbox's namespace and the same server software
//!    listening on the plain tap's far end. Printed as ratios plain/policy (>= 0.8 is the target).
//!
//! Needs root, the provisioned kernel, agent and test registry (like the tests).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_net::network::{host_addresses, NetworkOptions, SandboxNetwork};
use hearth_net::policy::{Mode, NetworkPolicy};
use hearth_sandbox::{Networking, Sandbox, SandboxConfig};
use hearth_testkit::fake_internet::{FakeInternet, WEB};
use hearth_vm::channel::ExecRequest;

const GUEST_PROBE: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def get(path):
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
    total = 0
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        total += len(b)
    s.close()
    return total
lat = []
for _ in range(30):
    t = time.monotonic(); get("/small"); lat.append(time.monotonic() - t)
lat.sort()
t = time.monotonic(); n = get("/big"); dt = time.monotonic() - t
print(f"{lat[len(lat) // 2] * 1000:.2f} {lat[-1] * 1000:.2f} {n * 8 / dt / 1e6:.2f} {n}")
"#;

fn percentile(mut samples: Vec<Duration>, p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A `python3 -m http.server` serving `dir` on `bind:8080` inside the namespace at `netns`.
fn http_server(netns: &str, bind: &str, dir: &Path) -> Child {
    Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args([
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            bind,
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nsenter python3 -m http.server")
}

async fn probe(sandbox: &Sandbox, host: &str) -> (f64, f64, f64) {
    let out = sandbox
        .client()
        .exec(ExecRequest {
            argv: vec![
                "python3".into(),
                "-c".into(),
                GUEST_PROBE.into(),
                host.into(),
                "8080".into(),
            ],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            ..ExecRequest::default()
        })
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(
        f.len() == 4 && f[3] as u64 >= 32 << 20,
        "guest probe to {host}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (f[0], f[1], f[2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let internet = FakeInternet::start().unwrap();
    let home = tempfile::Builder::new()
        .prefix("hnb")
        .tempdir_in("/tmp")
        .unwrap();
    let mut options = NetworkOptions::for_host(Some(internet.dns_server())).unwrap();
    options.host_addrs = host_addresses().unwrap();

    // 1. Set-up and teardown cost.
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..30 {
        let t = Instant::now();
        let net = SandboxNetwork::start(
            home.path(),
            &format!("cost{i}"),
            NetworkPolicy::none(),
            &options,
        )
        .unwrap();
        up.push(t.elapsed());
        let t = Instant::now();
        net.teardown().unwrap();
        down.push(t.elapsed());
    }
    println!(
        "network set-up       p50 {}  p99 {}   (target < 20 ms)",
        ms(percentile(up.clone(), 0.5)),
        ms(percentile(up, 0.99))
    );
    println!(
        "network teardown     p50 {}  p99 {}",
        ms(percentile(down.clone(), 0.5)),
        ms(percentile(down, 0.99))
    );

    // 2. Policy update latency.
    let net =
        SandboxNetwork::start(home.path(), "policy", NetworkPolicy::none(), &options).unwrap();
    let allow = NetworkPolicy::new(
        Mode::Allow,
        vec![
            "*.example".parse().unwrap(),
            "198.51.100.0/24:443".parse().unwrap(),
        ],
        vec![],
    )
    .unwrap();
    let mut updates = Vec::new();
    for i in 0..50 {
        let policy = if i % 2 == 0 {
            allow.clone()
        } else {
            NetworkPolicy::none()
        };
        let t = Instant::now();
        net.set_policy(policy).unwrap();
        updates.push(t.elapsed());
    }
    net.teardown().unwrap();
    println!(
        "policy update        p50 {}  p99 {}   (API call -> enforced; target < 1 s)",
        ms(percentile(updates.clone(), 0.5)),
        ms(percentile(updates, 0.99))
    );

    // 3. One guest, policy path vs plain tap.
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("small"), b"x").unwrap();
    std::fs::write(files.path().join("big"), vec![7u8; 32 << 20]).unwrap();
    let registry = hearth_testkit::registry().unwrap();
    let pull = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home.path())
        .unwrap()
        .ensure(&hearth_testkit::image_ref("python").unwrap(), &pull)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home.path());
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    config.network = Some(Networking {
        options,
        home: home.path().to_owned(),
    });
    config.network_policy = NetworkPolicy::new(
        Mode::Allow,
        vec!["198.51.100.0/24".parse().unwrap()],
        vec![],
    )
    .unwrap();
    let sandbox = Sandbox::create(&config, image).await.unwrap();
    let netns = home.path().join("net").join(sandbox.id()).join("netns");
    let netns = netns.to_string_lossy().into_owned();

    let mut internet_server = http_server(
        &format!("/run/netns/{}", internet.netns_name()),
        &WEB.to_string(),
        files.path(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let policy = probe(&sandbox, &WEB.to_string()).await;
    internet_server.kill().ok();
    internet_server.wait().ok();

    // The plain tap: the same guest and tap with the firewall table gone and the server on the
    // tap's far end, so nothing but the kernel sits between guest and server.
    let removed = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["nft", "delete", "table", "inet", "hearth"])
        .status()
        .unwrap();
    assert!(removed.success(), "removing the sandbox's table");
    let gateway = hearth_net::addressing::GATEWAY.to_string();
    let mut plain_server = http_server(&netns, &gateway, files.path());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let plain = probe(&sandbox, &gateway).await;
    plain_server.kill().ok();
    plain_server.wait().ok();
    sandbox.destroy().await.unwrap();

    println!(
        "request latency      policy p50 {:.1} ms p99 {:.1} ms | plain tap p50 {:.1} ms p99 {:.1} ms | ratio plain/policy (p50) {:.2}",
        policy.0, policy.1, plain.0, plain.1, plain.0 / policy.0
    );
    println!(
        "download 32 MiB      policy {:.1} Mbit/s | plain tap {:.1} Mbit/s | ratio policy/plain {:.2}   (target >= 0.8)",
        policy.2, plain.2, policy.2 / plain.2
    );
}
