//! A fake "internet" for network tests, so no test needs the real one: a network namespace
//! (`ip netns add hearth-fi-<pid>-<n>`) joined to the host by a veth pair, with host routes for the
//! documentation ranges 198.51.100.0/24 and 203.0.113.0/24 through it, serving:
//! - HTTP on [`WEB`]:80 and [`OTHER_WEB`]:80, answering `host=H path=P from=IP`;
//! - HTTPS on [`WEB`]:443 with a self-signed certificate for every zone name
//!   ([`FakeInternet::cert_pem`]), answering the same plus `sni=S`;
//! - DNS (UDP) on [`DNS`]:53 for a fixed zone ([`default_zone`] or the caller's);
//! - a PEP 503 package index on [`INDEX`]:80 (`/simple/`) with one pure-Python wheel built at start
//!   with python3's zipfile ([`PACKAGE`], module [`PACKAGE_MODULE`]).
//!
//! Sockets are created by a thread that entered the namespace (they stay there) and served by a
//! tokio runtime this value owns. Changes to the host: the veth's host end and the two routes,
//! nothing else; [`Drop`] removes the namespace (which takes the veth and its routes with it).
//! Routes for the same ranges cannot exist twice, so fake internets of concurrent test processes
//! take turns (a lock file); a namespace left by a killed test process is removed by the next
//! start.
//! Needs root.

mod dns;
mod web;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};

pub use dns::ZoneEntry;

/// The main web server (HTTP and HTTPS).
pub const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// A second web server in the other documentation range (HTTP).
pub const OTHER_WEB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The package index (HTTP).
pub const INDEX: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// The DNS server (UDP port 53).
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The ranges routed to the fake internet.
pub const ROUTED: [&str; 2] = ["198.51.100.0/24", "203.0.113.0/24"];
/// The package the index serves (`pip install hearth-fake-pkg`).
pub const PACKAGE: &str = "hearth-fake-pkg";
/// What the package installs: `import hearth_fake_pkg; hearth_fake_pkg.GREETING`.
pub const PACKAGE_MODULE: &str = "hearth_fake_pkg";
/// `hearth_fake_pkg.GREETING`.
pub const PACKAGE_GREETING: &str = "hello from the fake package index";

/// The veth link's addresses (host end, namespace end), from the benchmarking range 198.18.0.0/15.
const LINK_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LINK_NETNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NAME_PREFIX: &str = "hearth-fi-";
const LOCK_FILE: &str = "/run/hearth-fake-internet.lock";

/// The zone [`FakeInternet::start`] serves: `allowed.example` and `cdn.example` -> [`WEB`],
/// `other.example` -> [`OTHER_WEB`], `pypi.example` -> [`INDEX`], `a.wild.example` and
/// `b.wild.example` -> [`WEB`], `rebind.example` -> 127.0.0.1 (a DNS-rebinding attempt), with
/// TTLs of 60 s (`short-ttl.example` -> [`WEB`] with 2 s).
pub fn default_zone() -> Vec<ZoneEntry> {
    vec![
        ZoneEntry::new("allowed.example", WEB, 60),
        ZoneEntry::new("cdn.example", WEB, 60),
        ZoneEntry::new("other.example", OTHER_WEB, 60),
        ZoneEntry::new("pypi.example", INDEX, 60),
        ZoneEntry::new("a.wild.example", WEB, 60),
        ZoneEntry::new("b.wild.example", WEB, 60),
        ZoneEntry::new("short-ttl.example", WEB, 2),
        ZoneEntry::new("rebind.example", Ipv4Addr::LOCALHOST, 60),
    ]
}

/// A running fake internet; dropping it removes it.
pub struct FakeInternet {
    netns: String,
    cert_der: Vec<u8>,
    /// The veth's host end.
    host_end: String,
    cert_pem: String,
    zone: Arc<Vec<ZoneEntry>>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Held for this value's life: the routed ranges are ours.
    _lock: File,
}

impl FakeInternet {
    /// Starts one with [`default_zone`].
    pub fn start() -> anyhow::Result<FakeInternet> {
        FakeInternet::start_with_zone(default_zone())
    }

    /// Starts one whose DNS server answers `zone`.
    pub fn start_with_zone(zone: Vec<ZoneEntry>) -> anyhow::Result<FakeInternet> {
        ensure!(
            crate::is_root(),
            "the fake internet needs root (ip netns, veth, routes)"
        );
        let lock = take_turn()?;
        remove_stale_namespaces();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{NAME_PREFIX}{}-{n}", std::process::id());
        let host_end = format!("hfi{}{n}h", std::process::id());
        let mut fake = FakeInternet {
            netns,
            cert_der: Vec::new(),
            host_end,
            cert_pem: String::new(),
            zone: Arc::new(zone),
            runtime: None,
            _lock: lock,
        };
        fake.build_network()?;
        fake.serve()?;
        Ok(fake)
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// The DNS server's address (point `--dns-upstream` here).
    pub fn dns_server(&self) -> SocketAddr {
        SocketAddr::from((DNS, 53))
    }

    /// The zone the DNS server answers.
    pub fn zone(&self) -> &[ZoneEntry] {
        &self.zone
    }

    /// The package index URL for `pip install --index-url` (plain HTTP: pip also needs
    /// `--trusted-host 198.51.100.20`).
    pub fn index_url(&self) -> String {
        format!("http://{INDEX}/simple/")
    }

    /// The HTTPS server's self-signed certificate (PEM), valid for every zone name and [`WEB`].
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// [`FakeInternet::cert_pem`] as DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Namespace, veth pair, addresses and the host routes.
    fn build_network(&self) -> anyhow::Result<()> {
        let ns = self.netns.as_str();
        let host_end = self.host_end.as_str();
        let ns_end = format!("{}n", host_end.trim_end_matches('h'));
        ensure!(host_end.len() <= 15, "veth name {host_end} too long");
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", host_end, "type", "veth", "peer", "name", &ns_end, "netns", ns,
        ])?;
        ip(&["addr", "add", &format!("{LINK_HOST}/30"), "dev", host_end])?;
        ip(&["link", "set", host_end, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{LINK_NETNS}/30"),
            "dev",
            &ns_end,
        ])?;
        ip(&["-n", ns, "link", "set", &ns_end, "up"])?;
        for address in [WEB, OTHER_WEB, INDEX, DNS] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ])?;
        }
        for range in ROUTED {
            ip(&[
                "route",
                "add",
                range,
                "via",
                &LINK_NETNS.to_string(),
                "dev",
                host_end,
            ])?;
        }
        Ok(())
    }

    /// Binds every server's socket inside the namespace and serves them on a runtime of our own.
    fn serve(&mut self) -> anyhow::Result<()> {
        let mut names: Vec<String> = self.zone.iter().map(|e| e.name.clone()).collect();
        names.push(WEB.to_string());
        let certified = rcgen::generate_simple_self_signed(names)
            .context("generating the HTTPS certificate")?;
        self.cert_pem = certified.cert.pem();
        self.cert_der = certified.cert.der().to_vec();
        let tls = tls_acceptor(&certified)?;
        let package = Arc::new(build_package()?);
        let netns = self.path();
        let sockets = std::thread::spawn(move || bind_in(&netns))
            .join()
            .map_err(|_| anyhow::anyhow!("binding thread panicked"))??;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-internet")
            .enable_all()
            .build()?;
        let zone = self.zone.clone();
        // Registering the sockets needs the runtime's context (not block_on: the caller may be
        // inside a runtime already).
        let _context = runtime.enter();
        let tcp = tokio::net::TcpListener::from_std;
        let web = tcp(sockets.web)?;
        let other = tcp(sockets.other_web)?;
        let index = tcp(sockets.index)?;
        let https = tcp(sockets.https)?;
        let dns = tokio::net::UdpSocket::from_std(sockets.dns)?;
        runtime.spawn(web::serve_http(web, web::Site::Echo));
        runtime.spawn(web::serve_http(other, web::Site::Echo));
        runtime.spawn(web::serve_http(index, web::Site::Index(package)));
        runtime.spawn(web::serve_https(https, tls));
        runtime.spawn(dns::serve(dns, zone));
        drop(_context);
        self.runtime = Some(runtime);
        Ok(())
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Allowed inside an async test, unlike dropping the runtime.
            runtime.shutdown_background();
        }
        // Deleting the host end takes the pair and the routes through it at once, even while
        // sockets the runtime has not dropped yet keep the namespace alive.
        let _ = ip(&["link", "del", &self.host_end]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// Every server's socket, made inside the namespace.
struct Sockets {
    web: std::net::TcpListener,
    other_web: std::net::TcpListener,
    index: std::net::TcpListener,
    https: std::net::TcpListener,
    dns: std::net::UdpSocket,
}

/// Runs on a thread of its own: enters the namespace, binds, and ends (the namespace with it).
fn bind_in(netns: &Path) -> anyhow::Result<Sockets> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: setns on this thread only; the thread ends once the sockets are made.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        );
    }
    let tcp = |address: Ipv4Addr, port: u16| -> anyhow::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind((address, port))
            .with_context(|| format!("binding {address}:{port}"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    let dns = std::net::UdpSocket::bind((DNS, 53)).context("binding the DNS socket")?;
    dns.set_nonblocking(true)?;
    Ok(Sockets {
        web: tcp(WEB, 80)?,
        other_web: tcp(OTHER_WEB, 80)?,
        index: tcp(INDEX, 80)?,
        https: tcp(WEB, 443)?,
        dns,
    })
}

fn tls_acceptor(
    certified: &rcgen::CertifiedKey<rcgen::KeyPair>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the generated key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Builds the wheel with python3's zipfile into a temp dir and returns it with its hash.
fn build_package() -> anyhow::Result<web::Package> {
    let dir = tempfile::tempdir()?;
    let file_name = format!("{PACKAGE_MODULE}-1.0-py3-none-any.whl");
    let path = dir.path().join(&file_name);
    let script = format!(
        r#"
import base64, hashlib, sys, zipfile
files = {{
    "{module}/__init__.py": 'GREETING = {greeting:?}\n',
    "{module}-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n",
    "{module}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hearth-testkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
for name, text in files.items():
    data = text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{{name}},sha256={{digest}},{{len(data)}}")
record.append("{module}-1.0.dist-info/RECORD,,")
files["{module}-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as wheel:
    for name, text in files.items():
        wheel.writestr(name, text)
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
"#,
        module = PACKAGE_MODULE,
        project = PACKAGE,
        greeting = PACKAGE_GREETING,
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .context("running python3 to build the test wheel")?;
    ensure!(
        out.status.success(),
        "building the test wheel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(web::Package {
        project: PACKAGE.into(),
        file_name,
        wheel: std::fs::read(&path)?,
        sha256: String::from_utf8(out.stdout)?.trim().to_string(),
    })
}

/// Waits for the routed ranges to be free: one fake internet per machine at a time.
fn take_turn() -> anyhow::Result<File> {
    let lock = File::create(LOCK_FILE).with_context(|| format!("creating {LOCK_FILE}"))?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {LOCK_FILE}: {}", std::io::Error::last_os_error());
    }
    Ok(lock)
}

/// Removes namespaces whose creating process is gone (a killed test), with their veths and routes.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
