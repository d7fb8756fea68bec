//! A sandbox network's life against the real kernel: what `create` builds inside the namespace
//! (and nothing outside it), who may open the tap, and that `teardown` and `sweep` (after a
//! simulated `kill -9`) leave no mount, file or link behind. Needs root and nft.

mod kernel_common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use hearth_net::addressing::TAP_NAME;
use hearth_net::rules::IpRules;
use hearth_net::sandbox_net::{self, SandboxNet, SandboxNetError};
use kernel_common::{can_run, host_links, mounts_under, run_in_ns};

#[test]
fn create_builds_only_the_tap_and_teardown_removes_everything() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let links_before = host_links();
    let mut net = SandboxNet::create(home.path(), "life-1", &IpRules::default(), None).unwrap();
    let ns = net.netns_path().to_owned();
    assert_eq!(ns, home.path().join("net/life-1/netns"));

    let (ok, link) = run_in_ns(&ns, "ip", &["-o", "link", "show"]);
    assert!(ok, "{link}");
    let names: Vec<&str> = link
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["lo", TAP_NAME],
        "the namespace holds lo and the tap only"
    );
    let (_, tap) = run_in_ns(&ns, "ip", &["-o", "link", "show", "dev", TAP_NAME]);
    assert!(tap.contains("mtu 1500"), "{tap}");
    assert!(tap.contains("link/ether 06:00:64:60:00:01"), "{tap}");
    assert!(tap.contains(",UP"), "{tap}");
    let (_, lo) = run_in_ns(&ns, "ip", &["-o", "link", "show", "dev", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let (_, addr) = run_in_ns(&ns, "ip", &["-o", "-4", "addr", "show"]);
    assert!(
        addr.contains(&format!("{TAP_NAME}    inet 100.96.0.1/30")),
        "{addr}"
    );
    let (_, detail) = run_in_ns(&ns, "ip", &["-d", "link", "show", "dev", TAP_NAME]);
    assert!(detail.contains("persist on"), "{detail}");

    // Nothing routes off the link: the only route is the /30 itself.
    let (_, routes) = run_in_ns(&ns, "ip", &["-4", "route", "show", "table", "all"]);
    let off_link: Vec<&str> = routes
        .lines()
        .filter(|r| !r.contains(TAP_NAME) && !r.contains(" dev lo "))
        .collect();
    assert!(
        off_link.is_empty(),
        "routes off the link: {off_link:?}\n{routes}"
    );
    let (reachable, why) = run_in_ns(&ns, "ip", &["-4", "route", "get", "198.51.100.1"]);
    assert!(!reachable, "a route off the link exists: {why}");
    let (_, v6) = run_in_ns(&ns, "cat", &["/proc/sys/net/ipv6/conf/all/disable_ipv6"]);
    assert_eq!(v6.trim(), "1", "IPv6 is off in the namespace");
    let (_, v6_addrs) = run_in_ns(&ns, "ip", &["-6", "addr", "show"]);
    assert!(v6_addrs.trim().is_empty(), "{v6_addrs}");
    let (_, tables) = run_in_ns(&ns, "nft", &["list", "tables"]);
    assert_eq!(tables.trim(), "table inet hearth");
    let host_tables = std::process::Command::new("/usr/sbin/nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let host_tables = String::from_utf8_lossy(&host_tables.stdout);
    assert!(
        !host_tables.contains("hearth"),
        "the host's firewall changed: {host_tables}"
    );

    assert_eq!(mounts_under(home.path()).len(), 1);
    assert!(
        !host_links().iter().any(|l| l == TAP_NAME),
        "the tap is not in the host namespace"
    );
    // The host's own IPv6 switch is untouched.
    assert_ne!(
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6").ok(),
        None
    );

    net.teardown().unwrap();
    net.teardown().unwrap();
    drop(net);
    assert!(
        mounts_under(home.path()).is_empty(),
        "{:?}",
        mounts_under(home.path())
    );
    assert!(!home.path().join("net/life-1").exists());
    // The namespace dies asynchronously; a device it held that the kernel moved out instead of
    // deleting would show up on the host as `devN`.
    std::thread::sleep(Duration::from_millis(500));
    let new_links: Vec<String> = host_links()
        .into_iter()
        .filter(|l| !links_before.contains(l))
        .filter(|l| l.starts_with("hearth") || l.starts_with("dev"))
        .collect();
    assert!(
        new_links.is_empty(),
        "links left on the host: {new_links:?}"
    );
}

/// The attack: another unprivileged uid (another sandbox's VMM) opens this sandbox's tap to read
/// or inject its guest's traffic. Only the owner uid may attach without CAP_NET_ADMIN.
#[test]
fn only_the_owner_uid_may_open_the_tap() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let owner = 64_123;
    let net = SandboxNet::create(home.path(), "owned-1", &IpRules::default(), Some(owner)).unwrap();
    let (_, detail) = run_in_ns(
        net.netns_path(),
        "ip",
        &["-d", "link", "show", "dev", TAP_NAME],
    );
    assert!(detail.contains(&format!("user {owner}")), "{detail}");

    let ns = hearth_net::netns::NetNs::open(net.netns_path()).unwrap();
    let attach_as = |uid: u32| {
        ns.run_in(move || {
            // /dev/net/tun is opened with privileges (the VMM gets this fd); the tap's own check
            // happens at TUNSETIFF, with the thread's credentials, which drop to `uid` here (the
            // raw syscall changes this thread only).
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
            assert_eq!(rc, 0);
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(TAP_NAME.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .unwrap()
    };
    attach_as(owner).expect("the owner attaches");
    let stranger = attach_as(owner + 1).expect_err("another uid attaches");
    assert_eq!(stranger.raw_os_error(), Some(libc::EPERM), "{stranger}");
}

/// After `kill -9` of hearth nothing runs `Drop`; the next start's sweep removes every network no
/// record owns and keeps the owned ones.
#[test]
fn sweep_removes_what_a_killed_hearth_left() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let kept = SandboxNet::create(home.path(), "kept", &IpRules::default(), None).unwrap();
    let lost = SandboxNet::create(home.path(), "lost", &IpRules::default(), None).unwrap();
    std::mem::forget(lost);
    assert_eq!(mounts_under(home.path()).len(), 2);
    // A crash between making the directory and mounting leaves an empty file; a stray file may
    // sit where a directory should.
    std::fs::create_dir(home.path().join("net/half")).unwrap();
    std::fs::write(home.path().join("net/half/netns"), "").unwrap();
    std::fs::write(home.path().join("net/stray"), "").unwrap();

    let mut removed = sandbox_net::sweep(home.path(), |id| id == "kept").unwrap();
    removed.sort();
    assert_eq!(removed, ["half", "lost", "stray"]);
    assert!(!home.path().join("net/lost").exists());
    let mounts = mounts_under(home.path());
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].contains("/net/kept/netns"), "{mounts:?}");
    assert!(kept.netns_path().exists());

    std::mem::forget(kept);
    let removed = sandbox_net::sweep(home.path(), |_| false).unwrap();
    assert_eq!(removed, ["kept"]);
    assert!(mounts_under(home.path()).is_empty());
    assert_eq!(
        std::fs::read_dir(home.path().join("net")).unwrap().count(),
        0
    );
    assert!(sandbox_net::sweep(home.path(), |_| false)
        .unwrap()
        .is_empty());
}

/// Ids become path parts: a traversal or an absurd length is refused before anything is made; a
/// second network for the same id is refused; so is an absurd rule set.
#[test]
fn bad_ids_duplicates_and_absurd_rule_sets_are_refused() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    for id in ["../escape", "a/b", "", &"x".repeat(65)] {
        let err = SandboxNet::create(home.path(), id, &IpRules::default(), None).unwrap_err();
        assert!(
            matches!(err, SandboxNetError::InvalidId(_)),
            "{id:?}: {err}"
        );
    }
    assert!(!home.path().join("escape").exists());

    let _first = SandboxNet::create(home.path(), "dup", &IpRules::default(), None).unwrap();
    let err = SandboxNet::create(home.path(), "dup", &IpRules::default(), None).unwrap_err();
    assert!(matches!(err, SandboxNetError::Exists(_)), "{err}");

    let huge = IpRules {
        deny: (0..5000u32)
            .map(|i| {
                ipnet::IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(
                    0xc633_0000 + i,
                )))
            })
            .collect(),
        ..IpRules::default()
    };
    let err = SandboxNet::create(home.path(), "huge", &huge, None).unwrap_err();
    assert!(err.to_string().contains("at most 4096"), "{err}");
    assert!(!home.path().join("net/huge").exists());
    assert_eq!(mounts_under(home.path()).len(), 1);
}
