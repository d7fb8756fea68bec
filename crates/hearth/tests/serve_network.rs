//! Sandbox networking through the real daemon: a sandbox created with a policy over the API gets
//! it (and shows it), its resolver answers only allowed names (the guest's own `nslookup` against
//! the fake internet's DNS server as upstream), `PUT /network` replaces the policy while it runs
//! and the guest sees the change, a policy above the tenant's ceiling from the tokens file is
//! refused with 403, another tenant gets 404, `/metrics` shows the sandbox's network counters to
//! its tenant only, and deleting the sandbox removes its namespace.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::Duration;

use daemon::{image, ndjson_events, outputs, Daemon, Home, ALICE, BOB};
use reqwest::Method;
use serde_json::json;

/// Prints the guest kernel's clock source.
const CLOCKSOURCE: &str = "cat /sys/devices/system/clocksource/clocksource0/current_clocksource";

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
network = { mode = "allow", allow = ["*.example", "allowed.example"] }

[[tenants]]
name = "bob"
token = "bob-token-0002"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_set_read_replaced_and_bounded_by_the_tenant_ceiling() {
    let internet = hearth_testkit::fake_internet::FakeInternet::start().unwrap();
    let home = Home::new(TOKENS);
    let upstream = internet.dns_server().to_string();
    let d = Daemon::start(&home, &["--dns-upstream", &upstream]);

    // Above the ceiling at create: refused before anything boots.
    let (status, body) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox"), "network": {"mode": "open"}})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("ceiling"),
        "{body}"
    );

    let (status, sandbox) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox"),
                        "network": {"mode": "allow", "allow": ["allowed.example"]}})),
        )
        .await;
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert_eq!(sandbox["network"]["allow"], json!(["allowed.example"]));
    let netns = home.path().join("node/net").join(&id).join("netns");
    assert!(netns.exists(), "the sandbox has its own namespace");

    let (code, out) = exec(&d, &id, "nslookup allowed.example").await;
    assert!(
        code == 0 && out.contains("198.51.100.10"),
        "{out}\nthe guest's clock: {}",
        exec(&d, &id, CLOCKSOURCE).await.1
    );
    let (code, out) = exec(&d, &id, "nslookup other.example").await;
    assert!(code != 0, "a name outside the policy resolved: {out}");

    // Replaced live, within the ceiling; the guest sees it at once.
    let path = format!("/v1/sandboxes/{id}/network");
    let (status, view) = d
        .json(
            Method::PUT,
            &path,
            Some(ALICE),
            Some(json!({"mode": "allow", "allow": ["other.example"]})),
        )
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["policy"]["allow"], json!(["other.example"]));
    let (code, out) = exec(&d, &id, "nslookup other.example").await;
    assert!(code == 0 && out.contains("203.0.113.10"), "{out}");
    let (code, _) = exec(&d, &id, "nslookup allowed.example").await;
    assert!(code != 0, "the old policy still answers");
    let (status, view) = d.json(Method::GET, &path, Some(ALICE), None).await;
    assert_eq!(status, 200);
    assert!(
        view["stats"]["dns"]["refused"].as_u64().unwrap() >= 2,
        "{view}"
    );

    // Traffic through the proxy and a refused attempt (the allowed address, another Host) show
    // in /metrics under the tenant's token, per sandbox; never without a token or under another
    // tenant's (the attack: reading other tenants' sandbox ids and activity off /metrics).
    let (code, out) = exec(&d, &id, "wget -q -O - http://other.example/").await;
    assert!(code == 0 && out.contains("host=other.example"), "{out}");
    let (code, out) = exec(
        &d,
        &id,
        "wget -q -O - --header 'Host: allowed.example' http://other.example/",
    )
    .await;
    assert!(code != 0, "a disallowed Host got through: {out}");
    let text = metrics(&d, Some(ALICE)).await;
    let value = |family: &str| -> u64 {
        let prefix = format!("{family}{{sandbox=\"{id}\",tenant=\"alice\"}} ");
        let line = text.lines().find_map(|l| l.strip_prefix(&prefix));
        line.unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(value("hearth_sandbox_network_received_bytes_total") > 0);
    assert!(value("hearth_sandbox_network_sent_bytes_total") > 0);
    assert!(value("hearth_sandbox_network_connections_total") >= 1);
    assert!(value("hearth_sandbox_network_refused_connections_total") >= 1);
    assert!(value("hearth_sandbox_network_refused_dns_queries_total") >= 2);
    for token in [None, Some(BOB)] {
        let text = metrics(&d, token).await;
        assert!(
            text.contains("hearth_sandboxes{state=\"running\"}"),
            "{text}"
        );
        assert!(
            !text.contains(&id),
            "{token:?} sees alice's sandbox:\n{text}"
        );
        assert!(
            !text.contains("alice"),
            "{token:?} sees alice's name:\n{text}"
        );
    }
    let (status, _) = d
        .json(Method::GET, "/metrics", Some("not-a-token"), None)
        .await;
    assert_eq!(
        status, 401,
        "a bad token is an error, not an anonymous scrape"
    );

    // Above the ceiling, malformed, or someone else's: refused, and nothing changes.
    for (policy, want) in [
        (json!({"mode": "open"}), 403),
        (json!({"mode": "allow", "allow": ["10.0.0.0/8"]}), 403),
        (json!({"mode": "allow", "allow": ["not a name"]}), 422),
    ] {
        let (status, body) = d
            .json(Method::PUT, &path, Some(ALICE), Some(policy.clone()))
            .await;
        assert_eq!(status, want, "{policy}: {body}");
    }
    let (status, _) = d.json(Method::GET, &path, Some(BOB), None).await;
    assert_eq!(status, 404);
    let (_, record) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(record["network"]["allow"], json!(["other.example"]));
    // Its lookups need a clock finer than the jiffies (see hearth-vm's qemu/argv.rs): however
    // loaded the host was meanwhile, the guest kept it.
    let (_, clock) = exec(&d, &id, CLOCKSOURCE).await;
    assert!(
        !clock.contains("jiffies"),
        "the guest's clock fell back to {clock}"
    );

    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
    for _ in 0..50 {
        if !netns.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!netns.exists(), "the namespace outlived its sandbox");
}

/// `GET /metrics`'s text, with `token` when given.
async fn metrics(d: &Daemon, token: Option<&str>) -> String {
    d.get_text("/metrics", token).await
}

/// `sh -c script` in sandbox `id`: (exit code, stdout and stderr).
async fn exec(d: &Daemon, id: &str, script: &str) -> (i64, String) {
    let response = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({"argv": ["sh", "-c", script], "timeout_seconds": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (out, err, last) = outputs(&ndjson_events(response).await);
    (last["exit_code"].as_i64().unwrap_or(-1), out + &err)
}
