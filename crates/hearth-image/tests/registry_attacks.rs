//! Attacks by a hostile registry (issue #12, items 2-4), each against small hostile HTTP servers on
//! 127.0.0.1 that record what they receive: credentials offered to the wrong host (a Basic challenge,
//! a Bearer realm elsewhere), plain-http and private/metadata realm and redirect targets, endless
//! error and token bodies, a slow-drip registry, and an image with too many layers. None of these
//! pulls gets as far as building a root filesystem, so they need no root.

mod common;

use std::time::Duration;

use common::hostile::{
    authorizations, basic_challenge, plain_http_opts as opts, pull_err, Hostile, Reply,
};
use hearth_image::{Credentials, HostCredentials, PullOptions};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn creds(user: &str) -> Credentials {
    Credentials {
        username: user.into(),
        password: "s3cret".into(),
    }
}

/// A Docker client config (`$DOCKER_CONFIG/config.json`) holding a login for `host`.
fn docker_config_with_login(host: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let json =
        serde_json::json!({"auths": {host: {"username": "root-login", "password": "hunter2"}}});
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    // Each test runs in its own process under nextest.
    std::env::set_var("DOCKER_CONFIG", dir.path());
    dir
}

/// Attack: a tenant names its own registry, which answers every request with a Basic challenge to
/// collect whatever credentials the daemon holds (`--creds` for another registry, or root's
/// `docker login`). It must get none; only credentials bound to its own host are sent to it.
#[tokio::test]
async fn basic_challenge_collects_no_credentials_bound_to_another_host() {
    let evil = Hostile::start(basic_challenge).await;
    let _config = docker_config_with_login("registry.example:5000");
    let mut o = opts(&[&evil.addr]);
    o.credentials = HostCredentials::new().with("registry.example:5000", creds("operator"));
    let err = pull_err(
        &format!("{}/x/y:latest", evil.addr),
        &o,
        Duration::from_secs(10),
    )
    .await;
    assert!(err.contains("denied"), "{err}");
    assert!(!evil.seen().is_empty());
    assert_eq!(authorizations(&evil.seen()), Vec::<String>::new());

    // The same server does get credentials bound to its own host (so the check above can fail).
    o.credentials = HostCredentials::new().with(&evil.addr, creds("bound"));
    pull_err(
        &format!("{}/x/y:latest", evil.addr),
        &o,
        Duration::from_secs(10),
    )
    .await;
    assert!(authorizations(&evil.seen())
        .iter()
        .any(|a| a.starts_with("Basic ")));
}

/// Attack: a registry the operator has credentials for (bound to it) sends the token request to
/// a realm on another host. The realm must get no Basic credentials for the registry, neither
/// from `--creds` nor from the Docker config; it gets only credentials bound to its own host.
#[tokio::test]
async fn bearer_realm_on_another_host_gets_no_credentials() {
    let realm = Hostile::start(|_, _| Reply::Fixed(401, vec![], b"{}".to_vec())).await;
    let realm_url = format!("http://{}/token", realm.addr);
    let registry = Hostile::start(move |_, _| {
        Reply::Fixed(
            401,
            vec![format!(
                "WWW-Authenticate: Bearer realm=\"{realm_url}\",service=\"s\""
            )],
            b"{}".to_vec(),
        )
    })
    .await;
    let _config = docker_config_with_login(&registry.addr);
    let mut o = opts(&[&registry.addr, &realm.addr]);
    o.credentials = HostCredentials::new().with(&registry.addr, creds("operator"));
    let reference = format!("{}/x/y:latest", registry.addr);
    let err = pull_err(&reference, &o, Duration::from_secs(10)).await;
    assert!(err.contains("denied"), "{err}");
    assert!(realm.seen().iter().any(|s| s.path.starts_with("/token")));
    assert_eq!(authorizations(&realm.seen()), Vec::<String>::new());

    // A realm host with its own entry gets its own credentials.
    o.credentials = o.credentials.with(&realm.addr, creds("realm-user"));
    pull_err(&reference, &o, Duration::from_secs(10)).await;
    let sent = authorizations(&realm.seen());
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0],
        hearth_image::Credentials::basic_header(&creds("realm-user"))
    );
}

/// Attack: the token realm is plain http on a host not listed as an insecure registry (the token,
/// and any credentials, would cross the network in clear). Refused before any request to it.
#[tokio::test]
async fn plain_http_realm_is_refused() {
    let realm =
        Hostile::start(|_, _| Reply::Fixed(200, vec![], br#"{"token":"t"}"#.to_vec())).await;
    let realm_url = format!("http://{}/token", realm.addr);
    let registry = Hostile::start(move |_, _| {
        Reply::Fixed(
            401,
            vec![format!("WWW-Authenticate: Bearer realm=\"{realm_url}\"")],
            b"{}".to_vec(),
        )
    })
    .await;
    let err = pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &opts(&[&registry.addr]),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        err.contains("refuses the token realm") && err.contains("plain http"),
        "{err}"
    );
    assert!(realm.seen().is_empty(), "{:?}", realm.seen());
}

/// A registry that redirects every manifest request to `target` (formatted with the test's
/// second server's address).
async fn redirecting_registry(target: String) -> Hostile {
    Hostile::start(move |_, _| Reply::Fixed(307, vec![format!("Location: {target}")], Vec::new()))
        .await
}

/// Attack (SSRF): in serve mode a tenant's registry redirects the daemon to the cloud metadata
/// service, to another port on loopback, or (via a name) to loopback. All refused, nothing
/// reaches the target; the plain CLI (permissive) still follows a loopback redirect.
#[tokio::test]
async fn redirects_to_private_addresses_are_refused_in_serve_mode() {
    let inner = Hostile::start(|_, _| Reply::Fixed(404, vec![], Vec::new())).await;
    let serve = PullOptions {
        allow_private: false,
        ..opts(&[])
    };
    for (target, shows) in [
        (
            "https://169.254.169.254/latest/meta-data/".to_string(),
            "169.254.169.254",
        ),
        (format!("http://{}/v2/internal", inner.addr), "127.0.0.1"),
        (
            format!(
                "http://localhost:{}/v2/internal",
                inner.addr.rsplit(':').next().unwrap()
            ),
            "localhost",
        ),
    ] {
        let registry = redirecting_registry(target.clone()).await;
        let mut o = serve.clone();
        o.insecure_registries = vec![
            registry.addr.clone(),
            "127.0.0.1".into(),
            "localhost".into(),
        ];
        let err = pull_err(
            &format!("{}/x/y:latest", registry.addr),
            &o,
            Duration::from_secs(10),
        )
        .await;
        assert!(
            err.contains("hearth refuses") && err.contains(shows),
            "{target}: {err}"
        );
    }
    assert!(inner.seen().is_empty(), "{:?}", inner.seen());

    // Without serve mode's rule the loopback redirect is followed (so the checks above can fail).
    let registry = redirecting_registry(format!("http://{}/v2/internal", inner.addr)).await;
    let o = opts(&[&registry.addr, "127.0.0.1"]);
    pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &o,
        Duration::from_secs(10),
    )
    .await;
    assert!(!inner.seen().is_empty());
}

/// Attack: a redirect from the registry to plain http on a host not listed as insecure (the
/// https -> http downgrade is refused the same way; see `registry::policy`'s unit tests).
#[tokio::test]
async fn redirect_to_plain_http_is_refused() {
    let inner = Hostile::start(|_, _| Reply::Fixed(404, vec![], Vec::new())).await;
    let registry = redirecting_registry(format!("http://{}/v2/x", inner.addr)).await;
    let err = pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &opts(&[&registry.addr]),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        err.contains("hearth refuses") && err.contains("plain http"),
        "{err}"
    );
    assert!(inner.seen().is_empty());
}

/// Attack: an error answer with an endless body (memory exhaustion) full of terminal escapes.
/// The daemon reads at most 64 KiB, fails at once, and shows a short printable reason.
#[tokio::test]
async fn endless_error_body_is_cut_and_not_echoed() {
    let registry = Hostile::start(|seen, _| {
        if seen.method == "HEAD" {
            // No digest: the puller goes on to GET the manifest, and gets the endless body.
            return Reply::Fixed(200, vec![], Vec::new());
        }
        Reply::Endless(400, vec![], b"\x1b]0;owned\x07 go away ".repeat(1000))
    })
    .await;
    let err = pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &opts(&[&registry.addr]),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        err.contains("400") && err.contains("?]0;owned? go away"),
        "{err}"
    );
    assert!(err.len() < 600, "{} bytes: {err}", err.len());
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
}

/// Attack: the token endpoint answers 200 with an endless body. Cut at 64 KiB, pull refused fast.
#[tokio::test]
async fn endless_token_answer_is_cut() {
    let registry = Hostile::start(|seen, me| {
        if seen.path.starts_with("/token") {
            Reply::Endless(200, vec![], b"{\"token\":\"".repeat(1000))
        } else {
            Reply::Fixed(
                401,
                vec![format!(
                    "WWW-Authenticate: Bearer realm=\"http://{me}/token\""
                )],
                b"{}".to_vec(),
            )
        }
    })
    .await;
    let err = pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &opts(&[&registry.addr]),
        Duration::from_secs(5),
    )
    .await;
    assert!(err.contains("larger than 65536 bytes"), "{err}");
}

/// Attack: a slow-drip registry sends the manifest a byte at a time, never stalling long enough
/// to trip the stall timeout, to hold a boot slot for hours. The total pull deadline ends it.
#[tokio::test]
async fn slow_drip_registry_hits_the_pull_deadline() {
    let registry = Hostile::start(|_, _| {
        Reply::Drip(
            200,
            vec![format!("Content-Type: {OCI_MANIFEST}")],
            100_000,
            Duration::from_millis(100),
        )
    })
    .await;
    let o = PullOptions {
        deadline: Duration::from_secs(2),
        ..opts(&[&registry.addr])
    };
    let err = pull_err(
        &format!("{}/x/y:latest", registry.addr),
        &o,
        Duration::from_secs(5),
    )
    .await;
    assert!(err.contains("2 s pull deadline"), "{err}");
}

/// Attack: a manifest with 300 layers (two file descriptors and a task per layer). Refused with
/// the count before any blob is requested.
#[tokio::test]
async fn manifest_with_300_layers_is_refused() {
    let digest = |i: usize| format!("sha256:{i:064x}");
    let layers: Vec<_> = (1..=300)
        .map(|i| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(i), "size": 100}))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(1000), "size": 100},
        "layers": layers,
    }))
    .unwrap();
    let registry = Hostile::start(move |_, _| {
        Reply::Fixed(
            200,
            vec![format!("Content-Type: {OCI_MANIFEST}")],
            manifest.clone(),
        )
    })
    .await;
    let reference = format!("{}/many/layers:latest", registry.addr);
    let err = pull_err(
        &reference,
        &opts(&[&registry.addr]),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        err.contains("many/layers") && err.contains("300 layers") && err.contains("256"),
        "{err}"
    );
    assert!(!registry.seen().iter().any(|s| s.path.contains("/blobs/")));
}
