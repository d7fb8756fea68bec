//! Background processes through `hearth serve` with one real busybox VM under QEMU (TCG), and one
//! fork child: a process runs on after its start answered and its output is read later from an
//! offset or followed to its exit; stdin written and closed; stdout and stderr kept apart; a
//! signal; a pause and resume (the list is read while paused without waking it), a fork (the child
//! has its own copy, still running, with the output kept before the fork), a daemon restart and a
//! daemon crash keep a counting process running and its output flowing, and each next daemon has
//! the output the old one kept, while the CLI's `logs -f` follows another process through both;
//! the bound of 16 running per sandbox evicts ended ones first, then refuses; removing kills; a
//! flood of output is kept to its last 1 MiB in memory and two files of 1 MiB on disk; a process
//! whose sandbox failed is lost and its follower told so; the CLI's spawn, logs, ps and kill;
//! unknown processes, another tenant and bad input are refused. With an idle timeout (a second
//! VM): a `keep_awake` process holds the sandbox up until it ends, one that is not does not, and a
//! client reading output does while it reads.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use base64::Engine;
use daemon::{image, Daemon, Home, ALICE, BOB};
use reqwest::Method;
use serde_json::{json, Value};

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"

[[tenants]]
name = "bob"
token = "bob-token-0002"
"#;

const COUNTER: &str = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done";

async fn start(d: &Daemon, id: &str, body: Value) -> Value {
    let path = format!("/v1/sandboxes/{id}/processes");
    let (status, process) = d.json(Method::POST, &path, Some(ALICE), Some(body)).await;
    assert_eq!(status, 201, "{process}\n{}", d.log_text());
    process
}

async fn process(d: &Daemon, id: &str, n: u64) -> Value {
    let path = format!("/v1/sandboxes/{id}/processes/{n}");
    let (status, process) = d.json(Method::GET, &path, Some(ALICE), None).await;
    assert_eq!(status, 200, "{process}");
    process
}

/// `GET .../output` as alice: (the offset header, stdout, stderr, last event).
async fn output(d: &Daemon, id: &str, n: u64, query: &str) -> (u64, String, String, Value) {
    d.process_output(ALICE, id, n, query).await
}

/// The highest `tick N` in `text`.
fn last_tick(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or_else(|| panic!("no tick in {text:?}"))
}

/// Waits until process `n`'s kept output shows a tick past `after`; returns the highest.
async fn ticks_past(d: &Daemon, id: &str, n: u64, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _, _) = output(d, id, n, "offset=0").await;
        let tick = out
            .lines()
            .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
            .max();
        if let Some(tick) = tick.filter(|&t| t > after) {
            return tick;
        }
        assert!(
            Instant::now() < deadline,
            "no tick past {after} in sandbox {id}: {out:?}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_processes_run_on_and_survive_pause_fork_and_restart() {
    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &[]);
    let s = d
        .create_running(ALICE, json!({"image": image("busybox")}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let procs = format!("/v1/sandboxes/{id}/processes");

    // Started, it runs on after the answer; its output is there to read later.
    let counter = start(
        &d,
        &id,
        json!({"argv": ["sh", "-c", COUNTER], "tag": "counter"}),
    )
    .await;
    assert_eq!(
        (&counter["id"], &counter["running"], &counter["tag"]),
        (&json!(1), &json!(true), &json!("counter")),
        "{counter}"
    );
    let first = ticks_past(&d, &id, 1, 2).await;
    let (offset, out, _, last) = output(&d, &id, 1, "offset=0").await;
    assert!(out.starts_with("tick 0\ntick 1\n"), "{out:?}");
    assert_eq!(
        (offset, &last.get("exit_code")),
        (0, &None),
        "running: no end event"
    );
    // From an offset: only what came after it, and the header says where it starts.
    let seen = out.len() as u64;
    let (offset, later, _, _) = output(&d, &id, 1, &format!("offset={seen}")).await;
    assert_eq!(offset, seen);
    assert!(later.is_empty() || later.starts_with("tick "), "{later:?}");
    assert!(last_tick(&out) >= first);

    // stdin written, then closed: `cat` echoes it and exits 0; followed to its end.
    let cat = start(&d, &id, json!({"argv": ["cat"], "open_stdin": true})).await;
    assert_eq!(cat["id"], 2, "{cat}");
    let stdin = format!("{procs}/2/stdin");
    let data = base64::engine::general_purpose::STANDARD.encode("hello\n");
    let (status, body) = d
        .json(
            Method::POST,
            &stdin,
            Some(ALICE),
            Some(json!({"data": data})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = d
        .json(
            Method::POST,
            &stdin,
            Some(ALICE),
            Some(json!({"close": true})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, out, _, last) = output(&d, &id, 2, "follow=true").await;
    assert_eq!(
        (out.as_str(), &last["exit_code"]),
        ("hello\n", &json!(0)),
        "{last}"
    );
    let (status, body) = d
        .json(
            Method::POST,
            &stdin,
            Some(ALICE),
            Some(json!({"data": data})),
        )
        .await;
    assert_eq!(status, 409, "stdin of an ended process: {body}");

    // stdout and stderr apart; the exit code.
    let script = "echo out; echo err >&2; exit 3";
    start(&d, &id, json!({"argv": ["sh", "-c", script]})).await;
    let (_, out, err, last) = output(&d, &id, 3, "follow=true").await;
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(last["exit_code"], 3, "{last}");
    let ended = process(&d, &id, 3).await;
    assert_eq!(
        (
            &ended["running"],
            &ended["exit_code"],
            &ended["output_bytes"]
        ),
        (&json!(false), &json!(3), &json!(8)),
        "{ended}"
    );
    // Without stdin, writing to it is refused.
    let (status, _) = d
        .json(
            Method::POST,
            &format!("{procs}/1/stdin"),
            Some(ALICE),
            Some(json!({"data": data})),
        )
        .await;
    assert_eq!(status, 409);

    // Paused: the list is read without waking the sandbox; resumed, the counter goes on.
    let before_pause = ticks_past(&d, &id, 1, first).await;
    let (status, paused) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 200, "{paused}\n{}", d.log_text());
    let (status, list) = d.json(Method::GET, &procs, Some(ALICE), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["processes"].as_array().unwrap().len(), 3, "{list}");
    assert_eq!(list["processes"][0]["running"], true, "{list}");
    assert_eq!(
        d.record(ALICE, &id).await["state"],
        "paused",
        "reading woke it"
    );
    let (status, resumed) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 200, "{resumed}\n{}", d.log_text());
    let after_resume = ticks_past(&d, &id, 1, before_pause + 3).await;
    let counter = process(&d, &id, 1).await;
    assert_eq!(
        (&counter["running"], &counter["lost"]),
        (&json!(true), &Value::Null),
        "{counter}"
    );

    // A fork's child has its own copy of the counter, running and read by its own id, with the
    // output its parent had kept before the fork.
    let (_, before_fork, _, _) = output(&d, &id, 1, "offset=0").await;
    let (status, forked) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(ALICE),
            Some(json!({"count": 1})),
        )
        .await;
    assert_eq!(status, 201, "{forked}\n{}", d.log_text());
    let child = forked["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    let in_child = ticks_past(&d, &child, 1, last_tick(&before_fork)).await;
    let (offset, child_text, _, _) = output(&d, &child, 1, "offset=0").await;
    assert!(
        offset == 0 && child_text.starts_with(&before_fork),
        "the child's output does not start with its parent's: {offset} {child_text:?}"
    );
    assert!(in_child > last_tick(&before_fork));
    let child_counter = process(&d, &child, 1).await;
    assert_eq!(child_counter["running"], true, "{child_counter}");
    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{child}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let after_fork = ticks_past(&d, &id, 1, after_resume).await;

    // A signal: SIGTERM, passed on to the command, ends a second counter.
    let other = start(
        &d,
        &id,
        json!({"argv": ["sh", "-c", COUNTER], "tag": "second"}),
    )
    .await;
    let n = other["id"].as_u64().unwrap();
    let (status, body) = d
        .json(
            Method::POST,
            &format!("{procs}/{n}/signal"),
            Some(ALICE),
            Some(json!({"signal": 15})),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (_, _, _, last) = output(&d, &id, n, "follow=true").await;
    assert_eq!(last["signal"], 15, "{last}");

    // Removing kills and forgets: a process appending to a file stops.
    let beat = "while :; do echo x >> /tmp/beat; sleep 0.2; done";
    let beat = start(&d, &id, json!({"argv": ["sh", "-c", beat]})).await;
    let n = beat["id"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = d
        .json(Method::DELETE, &format!("{procs}/{n}"), Some(ALICE), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = d
        .json(Method::GET, &format!("{procs}/{n}"), Some(ALICE), None)
        .await;
    assert_eq!(status, 404);
    let (_, size, _) = d.exec_sh(ALICE, &id, "wc -c < /tmp/beat").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, later, _) = d.exec_sh(ALICE, &id, "wc -c < /tmp/beat").await;
    assert!(!size.is_empty() && size != "0", "it ran: {size:?}");
    assert_eq!(size, later, "the removed process still writes");

    // The CLI: spawn prints the id, logs -f exits with the process's code, ps lists it, kill
    // without a signal forgets it.
    let spawned = d
        .cli(
            &home,
            ALICE,
            &[
                "spawn",
                &id,
                "--tag",
                "cli",
                "--",
                "sh",
                "-c",
                "echo from-cli; exit 5",
            ],
            b"",
        )
        .await;
    assert_eq!(spawned.code, Some(0), "{}", spawned.stderr);
    let n = spawned.stdout.trim().to_owned();
    let logs = d.cli(&home, ALICE, &["logs", &id, &n, "-f"], b"").await;
    assert_eq!(
        (logs.code, logs.stdout.as_str()),
        (Some(5), "from-cli\n"),
        "{}",
        logs.stderr
    );
    let ps = d.cli(&home, ALICE, &["ps", &id], b"").await;
    let line = ps
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{n} ")))
        .unwrap_or_default();
    assert!(
        line.contains("exited(5)") && line.contains("cli"),
        "{}",
        ps.stdout
    );
    let killed = d.cli(&home, ALICE, &["kill", &id, &n], b"").await;
    assert_eq!(killed.code, Some(0), "{}", killed.stderr);
    let (status, _) = d
        .json(Method::GET, &format!("{procs}/{n}"), Some(ALICE), None)
        .await;
    assert_eq!(status, 404, "kill without a signal forgets it");

    // A flood of output: the daemon keeps the last 1 MiB, and its journal on disk stays within
    // two files of 1 MiB; removing the process removes them.
    const FLOOD: u64 = 3_000_000;
    let flood = start(
        &d,
        &id,
        json!({"argv": ["sh", "-c", format!("head -c {FLOOD} /dev/zero; exec sleep 600")]}),
    )
    .await;
    let n = flood["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let flooded = loop {
        let flooded = process(&d, &id, n).await;
        if flooded["output_bytes"] == FLOOD {
            break flooded;
        }
        assert!(Instant::now() < deadline, "{flooded}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(flooded["output_dropped"], FLOOD - (1 << 20), "{flooded}");
    let journal = home.path().join("node/processes").join(&id);
    let files = [
        journal.join(format!("{n}.out")),
        journal.join(format!("{n}.old")),
    ];
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .collect();
    assert!(
        sizes.iter().all(|&s| s <= (1 << 20) + 16) && sizes.iter().sum::<u64>() >= 1 << 20,
        "journal files of {sizes:?} bytes"
    );
    let (status, _) = d
        .json(Method::DELETE, &format!("{procs}/{n}"), Some(ALICE), None)
        .await;
    assert_eq!(status, 204);
    assert!(files.iter().all(|f| !f.exists()), "{files:?} outlived it");

    // The bound: ended processes make room (oldest first); 16 running ones refuse the next.
    let mut refused = None;
    for _ in 0..20 {
        let (status, body) = d
            .json(
                Method::POST,
                &procs,
                Some(ALICE),
                Some(json!({"argv": ["sleep", "600"]})),
            )
            .await;
        if status != 201 {
            refused = Some((status, body));
            break;
        }
    }
    let (status, body) = refused.expect("a 17th running process was refused");
    assert_eq!((status, &body["code"]), (429, &json!("limit")), "{body}");
    let (_, list) = d.json(Method::GET, &procs, Some(ALICE), None).await;
    let list = list["processes"].as_array().unwrap().clone();
    assert_eq!(list.len(), 16);
    assert!(
        list.iter().all(|p| p["running"] == true),
        "ended ones were evicted: {list:?}"
    );
    let (status, _) = d
        .json(Method::GET, &format!("{procs}/2"), Some(ALICE), None)
        .await;
    assert_eq!(status, 404, "the oldest ended process is forgotten");

    // Refused: another tenant, an unknown process, bad input.
    let (status, _) = d.json(Method::GET, &procs, Some(BOB), None).await;
    assert_eq!(status, 404, "another tenant's sandbox");
    let (status, _) = d
        .json(Method::GET, &format!("{procs}/999"), Some(ALICE), None)
        .await;
    assert_eq!(status, 404);
    for bad in [
        json!({"argv": []}),
        json!({"argv": ["true"], "tag": "x".repeat(65)}),
        json!({"argv": ["true"], "tag": "a\nb"}),
    ] {
        let (status, body) = d
            .json(Method::POST, &procs, Some(ALICE), Some(bad.clone()))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = d
        .json(
            Method::POST,
            &format!("{procs}/1/signal"),
            Some(ALICE),
            Some(json!({"signal": 0})),
        )
        .await;
    assert_eq!(status, 400);

    // A daemon restart (SIGTERM), then a crash (SIGKILL): each time the next daemon has the output
    // the old one kept, at the same offsets, and attaches to the counter again, output flowing.
    // Meanwhile `logs -f` follows a process across both, connecting again each time.
    let (_, list) = d.json(Method::GET, &procs, Some(ALICE), None).await;
    let sleeper = &list["processes"].as_array().unwrap().last().unwrap()["id"];
    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("{procs}/{sleeper}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204, "room for one more");
    let script = "echo first; sleep 12; echo second; exit 3";
    let followed = start(&d, &id, json!({"argv": ["sh", "-c", script]})).await;
    let followed = followed["id"].to_string();
    let follower = tokio::process::Command::from(daemon::hearth(&home))
        .args(["sandbox", "--host", &d.url, "--token", ALICE])
        .args(["logs", &id, &followed, "-f"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, before, _, _) = output(&d, &id, 1, "offset=0").await;
    let d = d.restart(&home, &[], ALICE, &id).await;
    let (offset, kept, _, _) = output(&d, &id, 1, "offset=0").await;
    assert!(
        offset == 0 && kept.starts_with(&before),
        "the output before the restart is gone: {offset} {kept:?}\n{}",
        d.log_text()
    );
    let restarted = ticks_past(&d, &id, 1, last_tick(&before)).await;
    assert!(restarted > after_fork);
    let (_, before, _, _) = output(&d, &id, 1, "offset=0").await;
    let d = d.crash_and_restart(&home, &[], ALICE, &id).await;
    let (offset, kept, _, _) = output(&d, &id, 1, "offset=0").await;
    assert!(
        offset == 0 && kept.starts_with(&before),
        "the output before the crash is gone: {offset} {kept:?}\n{}",
        d.log_text()
    );
    ticks_past(&d, &id, 1, last_tick(&before)).await;
    let followed = tokio::time::timeout(Duration::from_secs(120), follower.wait_with_output())
        .await
        .expect("logs -f ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert_eq!(
        (followed.status.code(), &followed.stdout[..]),
        (Some(3), &b"first\nsecond\n"[..]),
        "{stderr}"
    );
    assert!(stderr.contains("connecting again"), "{stderr}");
    let counter = process(&d, &id, 1).await;
    assert_eq!(
        (&counter["running"], &counter["tag"], &counter["argv"][2]),
        (&json!(true), &json!("counter"), &json!(COUNTER)),
        "{counter}"
    );

    // Its sandbox failing (the VMM killed) loses the counter with it, and a client following its
    // output is told so instead of waiting for ever.
    let from = format!("offset={}&follow=true", counter["output_bytes"]);
    let follow = output(&d, &id, 1, &from);
    let crash = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let vmm = daemon::processes_mentioning(&format!("/sandboxes/{id}/"));
        let vmm: Vec<u32> = vmm
            .iter()
            .filter(|(_, c)| c.contains("qemu"))
            .map(|(p, _)| *p)
            .collect();
        assert!(!vmm.is_empty(), "no VMM of {id} found");
        for pid in vmm {
            // SAFETY: kill has no memory-safety preconditions; the pid is the sandbox's VMM.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    };
    let ((_, _, _, last), ()) = tokio::join!(follow, crash);
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("its sandbox ended (failed"),
        "{last}\n{}",
        d.log_text()
    );
    let counter = process(&d, &id, 1).await;
    assert_eq!(counter["running"], false, "{counter}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_awake_processes_and_readers_hold_off_the_idle_timeout() {
    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &[]);
    let body = json!({"image": image("busybox"), "idle_timeout_seconds": 3, "on_idle": "pause"});
    let id = d.create_running(ALICE, body).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let asleep = |s: &Value| s["state"] == "paused";

    // A keep_awake build holds the sandbox up while it runs, though nothing else uses it; once
    // it ended the idle timeout pauses the sandbox, and its output is read without waking it.
    let argv = json!(["sh", "-c", "sleep 8; echo built"]);
    let build = start(&d, &id, json!({"argv": argv, "keep_awake": true})).await;
    assert_eq!(build["keep_awake"], true, "{build}");
    let started = Instant::now();
    let record = d
        .wait_for(ALICE, &id, Duration::from_secs(40), asleep)
        .await;
    assert_eq!(record["state"], "paused", "{record}\n{}", d.log_text());
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "paused {:?} after the start, with the build still running",
        started.elapsed()
    );
    let (_, out, _, last) = output(&d, &id, 1, "offset=0").await;
    assert_eq!((out.as_str(), &last["exit_code"]), ("built\n", &json!(0)));
    assert_eq!(
        d.record(ALICE, &id).await["state"],
        "paused",
        "a read woke it"
    );

    // Woken by an exec. A process that is not keep_awake does not hold it up, but a client
    // reading its output does, for as long as it reads.
    let (status, _, _) = d.exec_sh(ALICE, &id, "true").await;
    assert_eq!(status, 200);
    let server = start(&d, &id, json!({"argv": ["sleep", "600"]})).await;
    let n = server["id"].as_u64().unwrap();
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(7) {
        output(&d, &id, n, "offset=0").await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let record = d.record(ALICE, &id).await;
    assert_eq!(
        record["state"], "running",
        "reading its output is a use: {record}"
    );
    let record = d
        .wait_for(ALICE, &id, Duration::from_secs(40), asleep)
        .await;
    assert_eq!(record["state"], "paused", "{record}\n{}", d.log_text());
    let server = process(&d, &id, n).await;
    assert_eq!(
        server["running"], true,
        "it sleeps with its sandbox: {server}"
    );
}
