//! Shared parts of the kernel-side tests: a fake guest wired to a sandbox's tap the way a VMM is,
//! and small probes. The fake guest is a second network namespace with its own tap `eth0`
//! (the guest's address, MAC and default route); two threads copy Ethernet frames between that
//! tap and the sandbox's `hearth0`, as a VMM's virtio-net does, so every packet enters the sandbox
//! namespace through the real tap and meets the real table.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hearth_net::addressing::{GATEWAY, GUEST, GUEST_MAC, MTU, PREFIX_LEN, TAP_NAME};
use hearth_net::netns::{self, NetNs};
use hearth_net::sandbox_net::SandboxNet;
use hearth_net::tap::{self, TapConfig};

/// Whether the kernel tests can run here (root, nft); prints the skip reason when not.
pub fn can_run() -> bool {
    if !hearth_testkit::is_root() {
        hearth_testkit::skip("needs root (network namespaces, taps, nftables)");
        return false;
    }
    if !Path::new("/usr/sbin/nft").exists() && !Path::new("/sbin/nft").exists() {
        hearth_testkit::skip("needs nft (Debian package nftables)");
        return false;
    }
    true
}

/// A guest stand-in attached to a sandbox's tap.
pub struct FakeGuest {
    ns: NetNs,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wires: Vec<JoinHandle<()>>,
}

impl FakeGuest {
    /// Creates the guest namespace under `dir` and wires it to `net`'s tap.
    pub fn attach(net: &SandboxNet, dir: &Path) -> FakeGuest {
        let path = dir.join(format!("guest-{}", net.id()));
        let ns = NetNs::create(&path).expect("guest namespace");
        let mac: Vec<u8> = GUEST_MAC
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let cfg = TapConfig {
            name: "eth0".into(),
            mac: mac.try_into().unwrap(),
            address: GUEST,
            prefix_len: PREFIX_LEN,
            mtu: MTU,
            owner: None,
        };
        let guest_tap = ns
            .run_in(
                || -> Result<File, Box<dyn std::error::Error + Send + Sync>> {
                    tap::disable_ipv6()?;
                    tap::create_persistent(&cfg)?;
                    Ok(tap::open_tap("eth0")?)
                },
            )
            .unwrap()
            .expect("guest tap");
        let out = ns
            .command("ip")
            .unwrap()
            .args(["route", "add", "default", "via", &GATEWAY.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sandbox_tap = NetNs::open(net.netns_path())
            .unwrap()
            .run_in(|| tap::open_tap(TAP_NAME))
            .unwrap()
            .expect("open the sandbox tap as a VMM does");
        let stop = Arc::new(AtomicBool::new(false));
        let a = Arc::new(guest_tap);
        let b = Arc::new(sandbox_tap);
        let wires = vec![
            wire(a.clone(), b.clone(), stop.clone()),
            wire(b, a, stop.clone()),
        ];
        // A tap's queue starts passing frames only once the kernel has processed its carrier
        // change (link watch, asynchronous): frames sent before are dropped, and the first ARP
        // or SYN would then wait out a 1 s retransmit.
        for (ns_path, dev) in [(path.as_path(), "eth0"), (net.netns_path(), TAP_NAME)] {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (_, link) = run_in_ns(ns_path, "ip", &["-o", "link", "show", "dev", dev]);
                if link.contains("state UP") {
                    break;
                }
                assert!(Instant::now() < deadline, "{dev} never came up: {link}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        FakeGuest {
            ns,
            path,
            stop,
            wires,
        }
    }

    /// Runs `f` inside the guest (sockets it makes are the guest's).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run_in(f).unwrap()
    }

    /// A TCP connect from the guest, and how long it took to succeed or fail.
    pub fn connect(&self, to: SocketAddr) -> (io::Result<TcpStream>, Duration) {
        self.run(|| {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&to, Duration::from_secs(3));
            (r, start.elapsed())
        })
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.wires.drain(..) {
            let _ = w.join();
        }
        let _ = netns::remove(&self.path);
    }
}

/// Copies frames from `from` to `to` until `stop`.
fn wire(from: Arc<File>, to: Arc<File>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let n = unsafe { libc::poll(&mut pfd, 1, 50) };
            if n <= 0 {
                continue;
            }
            match (&*from).read(&mut buf) {
                Ok(len) => {
                    let _ = (&*to).write(&buf[..len]);
                }
                Err(_) => return,
            }
        }
    })
}

/// Accepts one connection on `listener` (non-blocking) within `within`.
pub fn accept_within(listener: &TcpListener, within: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok(conn) => return Some(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// Lines of /proc/self/mountinfo whose mount point is under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(dir)))
        .map(str::to_owned)
        .collect()
}

/// The host namespace's interface names.
pub fn host_links() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Output of a command run inside `ns`, with its success.
pub fn run_in_ns(ns_path: &Path, program: &str, args: &[&str]) -> (bool, String) {
    let out = NetNs::open(ns_path)
        .unwrap()
        .command(program)
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
