//! `hearth serve` over HTTPS with client certificates (`--tls-cert`, `--tls-key`, `--client-ca`),
//! the real binary with real TLS and certificates made for the test: a certificate from the
//! cluster CA is let in without a token (as the node's Kubernetes tenant), bearer tokens still work
//! without one, nothing at all is 401, a certificate from another CA is refused at the handshake,
//! and plain HTTP is not served on the TLS port. With only `--client-ca`, no tokens file is needed
//! and tokens are then refused. No VM is booted.

#[path = "gateway/pki.rs"]
mod pki;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pki::{Issued, Pki};

const TOKENS: &str = "[[tenants]]\nname = \"alice\"\ntoken = \"alice-token-0001\"\n";

/// A running `hearth serve`, killed on drop.
struct Serve {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_serve(dir: &Path, name: &str, args: &[&std::ffi::OsStr]) -> Serve {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .env("HEARTH_HOME", dir.join(format!("home-{name}")))
        .env_remove("HEARTH_TOKENS_FILE")
        .env_remove("RUST_LOG")
        .args([
            "-vv",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--capacity-disk",
            "1t",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn hearth serve");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        panic!(
            "hearth serve did not start ({line:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    Serve {
        addr: addr.to_string(),
        child,
        log,
    }
}

fn client(ca: &Pki, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca.ca_pem()).unwrap())
        .timeout(Duration::from_secs(20));
    if let Some(issued) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(&issued.identity_pem()).unwrap());
    }
    builder.build().unwrap()
}

async fn list(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> reqwest::Result<(u16, serde_json::Value)> {
    let mut request = client.get(format!("{url}/v1/sandboxes"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("gwtls")
        .tempdir_in("/tmp")
        .unwrap()
}

#[tokio::test]
async fn the_node_api_over_tls_takes_cluster_certificates_and_tokens() {
    let dir = tempdir();
    let cluster = Pki::new(dir.path(), "cluster");
    let rogue = Pki::new(dir.path(), "rogue");
    let node = cluster.server("node-1");
    let gateway = cluster.client("gateway");
    let impostor = rogue.client("gateway");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let serve = start_serve(
        dir.path(),
        "both",
        &[
            "--tls-cert".as_ref(),
            node.cert.as_os_str(),
            "--tls-key".as_ref(),
            node.key.as_os_str(),
            "--client-ca".as_ref(),
            cluster.ca().as_os_str(),
            "--tokens".as_ref(),
            tokens.as_os_str(),
        ],
    );
    let url = format!("https://{}", serve.addr);

    // The gateway's certificate: in, with no token, even with a wrong one.
    let with_cert = client(&cluster, Some(&gateway));
    let (status, body) = list(&with_cert, &url, None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sandboxes"], serde_json::json!([]));
    assert_eq!(
        list(&with_cert, &url, Some("not-a-token")).await.unwrap().0,
        200
    );

    // No certificate: tokens work as over plain HTTP; nothing or a bad token is 401.
    let anonymous = client(&cluster, None);
    assert_eq!(
        list(&anonymous, &url, Some("alice-token-0001"))
            .await
            .unwrap()
            .0,
        200
    );
    let (status, body) = list(&anonymous, &url, None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthorized");
    assert_eq!(
        list(&anonymous, &url, Some("wrong-token-0000"))
            .await
            .unwrap()
            .0,
        401
    );
    // Unauthenticated probes still answer.
    let health = anonymous
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // A certificate from another CA: refused at the handshake, no HTTP answer at all.
    let refused = list(
        &client(&cluster, Some(&impostor)),
        &url,
        Some("alice-token-0001"),
    )
    .await;
    assert!(refused.is_err(), "a rogue certificate got {refused:?}");

    // Plain HTTP is not served on the TLS port.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", serve.addr))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP answered on the TLS port"
    );
    let log = std::fs::read_to_string(&serve.log).unwrap_or_default();
    assert!(log.contains("TLS handshake refused"), "{log}");
}

#[tokio::test]
async fn with_only_a_client_ca_no_tokens_file_is_needed_and_tokens_are_refused() {
    let dir = tempdir();
    let cluster = Pki::new(dir.path(), "cluster");
    let node = cluster.server("node-1");
    let gateway = cluster.client("gateway");
    let serve = start_serve(
        dir.path(),
        "certs-only",
        &[
            "--tls-cert".as_ref(),
            node.cert.as_os_str(),
            "--tls-key".as_ref(),
            node.key.as_os_str(),
            "--client-ca".as_ref(),
            cluster.ca().as_os_str(),
        ],
    );
    let url = format!("https://{}", serve.addr);
    assert_eq!(
        list(&client(&cluster, Some(&gateway)), &url, None)
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        list(&client(&cluster, None), &url, Some("alice-token-0001"))
            .await
            .unwrap()
            .0,
        401
    );
}

#[test]
fn tls_flags_that_make_no_sense_alone_are_refused() {
    for args in [
        &["serve", "--client-ca", "/x/ca.pem"][..],
        &["serve", "--tls-cert", "/x/c.pem", "--tokens", "/x/t"][..],
        &["serve", "--tls-key", "/x/k.pem", "--tokens", "/x/t"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .env_remove("HEARTH_TOKENS_FILE")
            .env("HEARTH_HOME", "/nonexistent-hearth-home")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--tls-"), "{args:?}: {stderr}");
    }
}
