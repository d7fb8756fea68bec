//! The guest's side of the network and port forwarding, in one real guest (QEMU under TCG, the real
//! kernel and agent, the busybox test image): the VM gets a virtio-net NIC on a tap inside a network
//! namespace this test creates (`ip netns`, removed at the end; nothing changes in the host's own
//! namespace), with the gateway address on the tap as hearth's namespaces have it.
//!
//! Checks: the agent configured `eth0` (address, MTU, default route via the gateway) and wrote the
//! workload root's `/etc/resolv.conf` and `/etc/hosts`; a listener at the gateway address receives
//! the guest's TCP connection; and guest ports reached through the agent channel (no network path):
//! busybox `httpd`, an echo server with data both ways and half-close, a closed port refused at once.
//! A second guest, restored from a snapshot template built with the NIC, shows the same network
//! setup after RESUME (interface from the snapshot, resolver files written into the clone's root).
//!
//! Until `hearth-sandbox` gives sandboxes a NIC itself, the test assembles the VM from the sandbox's
//! own [`BootPlan`] and adds the NIC to its spec.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_proto::net::{GATEWAY, GUEST};
use hearth_sandbox::{BootPlan, Purpose, SandboxConfig, VmmChoice};
use hearth_vm::channel::{AgentClient, ExecHandle, ExecRequest, ForwardError, Resume};
use hearth_vm::{AgentEndpoint, NetworkInterface, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A network namespace made with `ip netns add` (a bind-mounted nsfs file under /run/netns),
/// holding a tap with the gateway address; deleted (with the tap) on drop.
struct TestNetns {
    name: String,
}

const TAP: &str = "hgn0";
const GUEST_MAC: &str = "06:00:64:60:00:02";

impl TestNetns {
    fn create() -> TestNetns {
        let name = format!("hearth-gn-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).unwrap();
        let netns = TestNetns { name };
        let n = netns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]).unwrap();
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"]).unwrap();
        ip(&["-n", n, "addr", "add", &format!("{GATEWAY}/30"), "dev", TAP]).unwrap();
        ip(&["-n", n, "link", "set", TAP, "up"]).unwrap();
        netns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A TCP listener bound inside the namespace (the socket stays there once made).
    fn listen(&self, address: SocketAddr) -> TcpListener {
        let path = self.path();
        std::thread::spawn(move || {
            let netns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this short-lived thread only; it ends right after binding.
            let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            TcpListener::bind(address).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn request(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    }
}

async fn sh(client: &AgentClient, script: &str) -> String {
    let out = client
        .exec(request(script))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a long-running guest command (a server); it lives as long as the handle.
async fn start(client: &AgentClient, script: &str) -> ExecHandle {
    client.exec(request(script)).await.unwrap()
}

/// Forwards to `port`, retrying while the server in the guest is still starting.
async fn forward_when_listening(client: &AgentClient, port: u16) -> hearth_vm::channel::PortStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.forward(port).await {
            Ok(stream) => return stream,
            Err(ForwardError::Refused { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("forwarding guest port {port}: {e}"),
        }
    }
}

/// The busybox test image, and a sandbox boot plan for it (QEMU, cold boot) whose VM has a NIC on
/// the namespace's tap. The run directory and scratch disk are made; nothing is started.
async fn plan_with_nic(home: &Path, netns: &TestNetns, id: &str) -> BootPlan {
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home)
        .unwrap()
        .ensure(&hearth_testkit::image_ref("busybox").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home);
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    config.vmm = VmmChoice::Qemu;
    config.snapshot = false;
    let mut plan = BootPlan::prepare(&config, &image, id, Purpose::Start).unwrap();
    plan.spec.network = Some(NetworkInterface {
        tap: TAP.into(),
        mac: GUEST_MAC.into(),
        netns: Some(netns.path()),
    });
    std::fs::create_dir_all(&plan.spec.run_dir).unwrap();
    hearth_vm::scratch::create_scratch_disk(
        home,
        &plan.spec.run_dir.join("scratch.ext4"),
        hearth_vm::scratch::DEFAULT_SCRATCH_BYTES,
    )
    .unwrap();
    plan
}

fn console_of(spec: &VmSpec) -> String {
    std::fs::read_to_string(&spec.console_log).unwrap_or_default()
}

/// What the agent set up: `eth0` (address, MAC, MTU, default route via the gateway), the workload
/// root's resolver files naming the gateway and `hostname`, and a working link: `listener` (at the
/// gateway address) receives the guest's TCP connection.
async fn assert_guest_network(client: &AgentClient, listener: TcpListener, hostname: &str) {
    let addr = sh(client, "ip addr show eth0").await;
    assert!(addr.contains(&format!("inet {GUEST}/30")), "{addr}");
    assert!(addr.contains("mtu 1500"), "{addr}");
    assert!(addr.contains(&format!("link/ether {GUEST_MAC}")), "{addr}");
    let routes = sh(client, "cat /proc/net/route").await;
    let gateway_hex = format!("{:08X}", u32::from(GATEWAY).swap_bytes());
    assert!(
        routes.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[0] == "eth0" && f[1] == "00000000" && f[2] == gateway_hex
        }),
        "no default route via {GATEWAY}: {routes}"
    );

    let resolv = sh(client, "cat /etc/resolv.conf").await;
    assert!(
        resolv.contains(&format!("nameserver {GATEWAY}")),
        "{resolv}"
    );
    let hosts = sh(client, "cat /etc/hosts").await;
    assert_eq!(sh(client, "hostname").await.trim(), hostname);
    assert!(hosts.contains(&format!("{GUEST}\t{hostname}")), "{hosts}");
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");

    let accepted = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).unwrap();
        (peer, got)
    });
    sh(
        client,
        &format!("echo hello-from-guest | nc -w 10 {GATEWAY} 7777"),
    )
    .await;
    let (peer, got) = tokio::task::spawn_blocking(move || accepted.join().unwrap())
        .await
        .unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(GUEST));
    assert_eq!(got, "hello-from-guest\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_with_a_nic_is_configured_and_its_ports_are_reachable_through_the_agent() {
    if !hearth_testkit::is_root() {
        return hearth_testkit::skip("network namespaces and taps need root");
    }
    let netns = TestNetns::create();
    let listener = netns.listen(SocketAddr::from((GATEWAY, 7777)));
    let home = tempfile::tempdir().unwrap();
    let plan = plan_with_nic(home.path(), &netns, "guestnet0001").await;
    let mut vm = plan.vmm.start(&plan.spec).unwrap();
    let AgentEndpoint::Stream(socket) = vm.agent_endpoint().clone() else {
        panic!("QEMU serves the agent on a stream socket");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let client = match AgentClient::connect_unix(&socket, deadline).await {
        Ok(client) => client,
        Err(e) => panic!("agent: {e}\n{}", console_of(&plan.spec)),
    };
    assert_guest_network(&client, listener, "hearth-guestnet0001").await;

    // Port forwarding over the agent channel: an HTTP server on the guest's loopback.
    sh(
        &client,
        "mkdir -p /www && echo served-from-the-guest > /www/index.html",
    )
    .await;
    let _httpd = start(&client, "exec httpd -f -p 127.0.0.1:8000 -h /www").await;
    let mut http = forward_when_listening(&client, 8000).await;
    http.write_all(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), http.read_to_string(&mut answer))
        .await
        .expect("HTTP answer within 30 s")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("served-from-the-guest\n"), "{answer}");

    // Data both ways: an echo server; half-close ends it.
    let _echo = start(&client, "exec nc -ll -p 9000 -e /bin/cat").await;
    let echo = forward_when_listening(&client, 9000).await;
    let (mut read, mut write) = tokio::io::split(echo);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
        write
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut echoed))
        .await
        .expect("echo within 60 s")
        .unwrap();
    writer.await.unwrap();
    assert!(
        echoed == data,
        "echoed {} of {} bytes",
        echoed.len(),
        data.len()
    );

    // A port nothing listens on: a typed error at once.
    let started = Instant::now();
    match client.forward(9999).await {
        Err(ForwardError::Refused { port: 9999, .. }) => {}
        Err(e) => panic!("expected Refused, got {e}"),
        Ok(_) => panic!("forward to a closed guest port succeeded"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));

    client.shutdown().await.unwrap();
    drop(client);
    let _ = vm.wait_timeout(Duration::from_secs(10));
    let _ = vm.kill();
}

/// A VM restored from a snapshot template that has the NIC: the interface configured before the
/// snapshot still works in the clone, and the clone's own workload root gets the resolver files
/// (with the hostname RESUME gave it) after RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_restored_from_a_template_keeps_its_nic_and_gets_its_resolver_files() {
    if !hearth_testkit::is_root() {
        return hearth_testkit::skip("network namespaces and taps need root");
    }
    let netns = TestNetns::create();
    let listener = netns.listen(SocketAddr::from((GATEWAY, 7777)));
    let home = tempfile::tempdir().unwrap();
    let plan = plan_with_nic(home.path(), &netns, "guestnet0002").await;
    let templates = plan.vmm.boot_templates().expect("QEMU has boot templates");
    let (template, restore_spec) = templates
        .template_for(home.path(), &plan.spec, true)
        .unwrap_or_else(|e| panic!("building the template: {e}"));
    assert!(template.built);
    let mut vm = plan.vmm.start(&restore_spec).unwrap();
    let hostname = "clone-with-nic";
    let resume = Resume {
        unix_time_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        seed: [0x5a; 32],
        hostname: hostname.into(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let connected = match vm.take_agent_stream() {
        Some(stream) => AgentClient::connect_stream_resume(stream, deadline, resume).await,
        None => AgentClient::connect_unix_resume(vm.agent_socket(), deadline, resume).await,
    };
    let client = match connected {
        Ok(client) => client,
        Err(e) => panic!("agent: {e}\n{}", console_of(&restore_spec)),
    };
    assert!(
        client
            .info()
            .await
            .unwrap()
            .boot
            .unwrap()
            .resume_ms
            .is_some(),
        "the VM was not restored"
    );
    assert_guest_network(&client, listener, hostname).await;
    client.shutdown().await.unwrap();
    drop(client);
    let _ = vm.wait_timeout(Duration::from_secs(10));
    let _ = vm.kill();
}
