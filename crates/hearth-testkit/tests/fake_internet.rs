//! The fake internet, queried from the host the way hearth's resolver and proxy will: HTTP on both
//! documentation ranges, HTTPS with SNI (trusting its certificate), DNS answers (TTL, NXDOMAIN, the
//! rebinding name), the package index with real pip, and that dropping it leaves nothing behind.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hearth_testkit::fake_internet::{self, FakeInternet};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn start() -> Option<FakeInternet> {
    if !hearth_testkit::is_root() {
        hearth_testkit::skip("the fake internet needs root");
        return None;
    }
    Some(FakeInternet::start().expect("starting the fake internet"))
}

/// One HTTP/1.1 request on `stream`; the whole answer.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, host: &str, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

async fn http(address: Ipv4Addr, host: &str, path: &str) -> String {
    let stream = tokio::net::TcpStream::connect((address, 80)).await.unwrap();
    get(stream, host, path).await
}

async fn https(fake: &FakeInternet, sni: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fake.cert_der().to_vec().into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect((fake_internet::WEB, 443))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    get(tls, sni, "/tls").await
}

async fn resolve(server: SocketAddr, name: &str) -> Message {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let mut query = Message::new();
    query
        .set_id(77)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    socket
        .send_to(&query.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("DNS answer within 5 s")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn a_records(answer: &Message) -> Vec<(Ipv4Addr, u32)> {
    answer
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_from_the_host() {
    let Some(fake) = start() else { return };

    // HTTP on both ranges reports the Host, the path and the client (the veth's host end).
    let answer = http(fake_internet::WEB, "allowed.example", "/some/path").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.ends_with("host=allowed.example path=/some/path from=198.18.0.1\n"),
        "{answer}"
    );
    let answer = http(fake_internet::OTHER_WEB, "other.example", "/").await;
    assert!(answer.contains("host=other.example path=/ "), "{answer}");

    // HTTPS: the certificate is valid for every zone name; the answer names the SNI it saw.
    for sni in ["cdn.example", "allowed.example"] {
        let answer = https(&fake, sni).await;
        assert!(answer.contains(&format!("sni={sni}\n")), "{answer}");
    }

    // DNS: the zone with its TTLs, NXDOMAIN for the rest, the rebinding name as configured.
    let server = fake.dns_server();
    let answer = resolve(server, "allowed.example.").await;
    assert_eq!(answer.id(), 77);
    assert_eq!(a_records(&answer), [(fake_internet::WEB, 60)]);
    let answer = resolve(server, "other.example.").await;
    assert_eq!(a_records(&answer), [(fake_internet::OTHER_WEB, 60)]);
    let answer = resolve(server, "short-ttl.example.").await;
    assert_eq!(a_records(&answer), [(fake_internet::WEB, 2)]);
    let answer = resolve(server, "rebind.example.").await;
    assert_eq!(a_records(&answer), [(Ipv4Addr::LOCALHOST, 60)]);
    let answer = resolve(server, "nowhere.example.").await;
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    assert!(answer.answers().is_empty());

    // The package index: its simple page, then real pip installing from it.
    let answer = http(fake_internet::INDEX, "pypi.example", "/simple/").await;
    assert!(answer.contains(fake_internet::PACKAGE), "{answer}");
    pip_installs_and_imports_the_package(&fake).await;
}

async fn pip_installs_and_imports_the_package(fake: &FakeInternet) {
    let pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output();
    if !pip.is_ok_and(|o| o.status.success()) {
        return hearth_testkit::skip("python3 -m pip is not installed: pip install not checked");
    }
    let target = tempfile::tempdir().unwrap();
    let index = fake.index_url();
    let target_path = target.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--isolated",
                "--disable-pip-version-check",
                "--trusted-host",
                &fake_internet::INDEX.to_string(),
                "--no-cache-dir",
                "--no-deps",
                "--index-url",
                &index,
                "--target",
            ])
            .arg(&target_path)
            .arg(fake_internet::PACKAGE)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "pip install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("python3")
        .env("PYTHONPATH", target.path())
        .args([
            "-c",
            &format!(
                "import {m}; print({m}.GREETING)",
                m = fake_internet::PACKAGE_MODULE
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        fake_internet::PACKAGE_GREETING,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What dropping must undo: the namespace, the veth and the host routes (a leak would break the
/// next run's routes and leave test addresses routed on the host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_it_leaves_no_namespace_link_or_route() {
    let Some(fake) = start() else { return };
    let name = fake.netns_name().to_string();
    let routes = |range: &str| {
        let out = Command::new("ip")
            .args(["route", "show", range])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(!routes("198.51.100.0/24").is_empty());
    assert!(std::path::Path::new("/run/netns").join(&name).exists());
    let reachable = tokio::net::TcpStream::connect((fake_internet::WEB, 80)).await;
    assert!(reachable.is_ok());
    drop(reachable);
    drop(fake);
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
    for range in fake_internet::ROUTED {
        assert_eq!(routes(range), "", "route for {range} left behind");
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    let pid = std::process::id().to_string();
    assert!(
        !links.lines().any(|l| l.contains(&format!("hfi{pid}"))),
        "veth left behind: {links}"
    );
}
