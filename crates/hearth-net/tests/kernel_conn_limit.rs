//! The per-sandbox connection limit in the namespace's table (`--net-conns`): a fake guest wired to
//! the sandbox's tap (see `kernel_common`) opens connections until the limit, and the next one is
//! refused at once by the kernel, before the proxy sees it. Needs root and nft.

mod kernel_common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hearth_net::network::{host_addresses, NetworkOptions, SandboxNetwork};
use hearth_net::policy::{Mode, NetworkPolicy};
use hearth_net::rules::IpRules;
use hearth_net::sandbox_net::SandboxNet;
use kernel_common::{accept_within, can_run, run_in_ns, FakeGuest};

/// A refusal must come at once, not after a timeout.
const AT_ONCE: Duration = Duration::from_millis(100);

const LIMIT: usize = 3;

fn open_rules() -> IpRules {
    IpRules {
        open: true,
        ..IpRules::default()
    }
}

/// Opens one guest connection that the proxy's listener accepts; both ends are kept.
fn open_one(guest: &FakeGuest, proxy: &std::net::TcpListener, i: usize) -> (TcpStream, TcpStream) {
    let to: SocketAddr = format!("198.51.100.{}:80", 10 + i).parse().unwrap();
    let (client, _) = guest.connect(to);
    let client = client.unwrap_or_else(|e| panic!("connection {} of {LIMIT}: {e}", i + 1));
    let (server, _) = accept_within(proxy, Duration::from_secs(2))
        .unwrap_or_else(|| panic!("connection {} did not reach the proxy", i + 1));
    (client, server)
}

fn assert_refused_at_once(guest: &FakeGuest, what: &str) {
    let (r, took) = guest.connect("203.0.113.10:443".parse().unwrap());
    let err = r.expect_err(&format!(
        "{what}: the connection beyond the limit was let through"
    ));
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{what}: {err}");
    assert!(took < AT_ONCE, "{what}: the refusal took {took:?}");
}

/// The attack: a guest opening TCP connections without end, to exhaust the host's conntrack table,
/// sockets and proxy tasks; then asking for a policy change, hoping the new rules start counting
/// from zero. With the limit at N, the N+1th concurrent connection is reset at once by the
/// sandbox's own table, also after the rules are replaced; closing one makes room again.
#[test]
fn the_connection_beyond_the_limit_is_refused_by_the_kernel() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let net = SandboxNet::create(home.path(), "conns-1", &open_rules(), None).unwrap();
    net.limit_connections(LIMIT).unwrap();
    let services = net.bind_services().unwrap();
    let guest = FakeGuest::attach(&net, home.path());

    let mut open: Vec<_> = (0..LIMIT)
        .map(|i| open_one(&guest, &services.proxy, i))
        .collect();
    assert_refused_at_once(&guest, "at the limit");
    assert!(
        accept_within(&services.proxy, Duration::from_millis(50)).is_none(),
        "the refused connection reached the proxy"
    );

    // New rules (a live policy change) keep the count.
    net.set_rules(&open_rules()).unwrap();
    assert_refused_at_once(&guest, "after the rules were replaced");

    // Closing one frees its place (conntrack sees the close).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    let again = loop {
        let (r, _) = guest.connect("198.51.100.99:80".parse().unwrap());
        match r {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("a closed connection never freed its place: {e}"),
        }
    };
    assert!(accept_within(&services.proxy, Duration::from_secs(2)).is_some());
    drop(again);
    drop(open);
    drop(guest);
    drop(services);
    drop(net);
}

/// `NetworkOptions::max_connections` (`--net-conns`) reaches the table of a sandbox network
/// started with it, and of one taken over by the next process.
#[tokio::test]
async fn a_sandbox_network_gets_its_options_limit() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let options = NetworkOptions {
        upstream: "127.0.0.1:53".parse().unwrap(),
        host_addrs: host_addresses().unwrap(),
        tap_owner: None,
        rate_limit: None,
        max_connections: 17,
    };
    let policy = NetworkPolicy::new(Mode::Open, vec![], vec![]).unwrap();
    let network = SandboxNetwork::start(home.path(), "conns-2", policy.clone(), &options).unwrap();
    let ns = network.netns_path();
    let chain = || {
        run_in_ns(
            &ns,
            "nft",
            &["list", "chain", "inet", "hearth", "conn_limit"],
        )
    };
    let (ok, listed) = chain();
    assert!(ok && listed.contains("ct count over 17"), "{listed}");
    network.release();
    // The released services' sockets close when the runtime drops their aborted tasks.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let options = NetworkOptions {
        max_connections: 5,
        ..options
    };
    let adopted = SandboxNetwork::adopt(home.path(), "conns-2", policy, &options).unwrap();
    let (ok, listed) = chain();
    assert!(ok && listed.contains("ct count over 5"), "{listed}");
    assert!(!listed.contains("over 17"), "{listed}");
    adopted.teardown().unwrap();
}
