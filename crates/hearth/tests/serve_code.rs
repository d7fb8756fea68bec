//! The code interpreter through `hearth serve` with one real VM of the python test image under
//! QEMU (TCG): names defined by one call are there in the next and the last expression's repr comes
//! back; output, exceptions and tracebacks; output written to fd 1 or to the driver's protocol
//! descriptor cannot pass for an answer; a timeout interrupts the code and keeps the state, code
//! that ignores SIGINT gets its interpreter killed; a crashed interpreter is restarted by the next
//! call, which says so; concurrent calls run one after the other; a reset starts afresh; a pause
//! and resume keeps the interpreter, state and count (also when the daemon was killed while the
//! sandbox was paused; a call a forced pause cuts short loses it, and the next call says so), a
//! fork's children each get a copy, and a daemon restart while it runs keeps it too; the CLI's
//! `hearth sandbox code`; unknown languages and sandboxes, and images without python3, are refused.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use daemon::{image, Daemon, Home, ALICE};
use reqwest::Method;
use serde_json::{json, Value};

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

async fn run_code(d: &Daemon, id: &str, body: Value) -> (u16, Value) {
    let path = format!("/v1/sandboxes/{id}/code");
    d.json(Method::POST, &path, Some(ALICE), Some(body)).await
}

/// Runs `code` (timeout 30 s) and expects a 200.
async fn run(d: &Daemon, id: &str, code: &str) -> Value {
    let (status, answer) = run_code(d, id, json!({"code": code, "timeout_seconds": 30})).await;
    assert_eq!(status, 200, "{code:?}: {answer}\n{}", d.log_text());
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_keeps_one_interpreter_across_calls() {
    let home = Home::new(TOKENS);
    let mut d = Daemon::start(&home, &[]);
    let (status, s) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("python")})),
        )
        .await;
    assert_eq!(status, 201, "{s}\n{}", d.log_text());
    let id = s["id"].as_str().unwrap().to_owned();

    // State carries over; the last expression's repr is the result.
    let first = run(&d, &id, "x = 41").await;
    assert_eq!(
        (
            &first["result"],
            &first["error"],
            &first["restarted"],
            &first["execution_count"]
        ),
        (&Value::Null, &Value::Null, &json!(false), &json!(1)),
        "{first}"
    );
    let second = run(&d, &id, "x + 1").await;
    assert_eq!(
        (&second["result"], &second["execution_count"]),
        (&json!("42"), &json!(2))
    );
    let text = run(&d, &id, "'a' * 3").await;
    assert_eq!(text["result"], "'aaa'");

    // A warm call is fast: no new exec per call (the figure is measured in bench/clients.py).
    let mut times = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(run(&d, &id, "1+1").await["result"], "2");
        times.push(started.elapsed());
    }
    times.sort();
    eprintln!("run_code(\"1+1\") median over 10 calls: {:?}", times[5]);

    // Output: print, stderr, fd 1 directly, a child process.
    let out = run(
        &d,
        &id,
        "import os, sys\nprint('hello')\nprint('oops', file=sys.stderr)\nos.write(1, b'raw\\n')\n\
         os.system('echo child')",
    )
    .await;
    assert_eq!(out["stdout"], "hello\nraw\nchild\n", "{out}");
    assert_eq!(out["stderr"], "oops\n", "{out}");
    assert_eq!(
        out["result"], "0",
        "os.system's status is the last expression: {out}"
    );

    // Output is bounded per call: the first MiB, a marker, `truncated`.
    let flood = run(&d, &id, "print('y' * (3 << 20))").await;
    let stdout = flood["stdout"].as_str().unwrap();
    assert_eq!(flood["truncated"], true);
    assert!(
        stdout.len() < (1 << 20) + 100,
        "{} bytes kept",
        stdout.len()
    );
    assert!(stdout.starts_with("yyy") && stdout.contains("more bytes not kept"));

    // An exception with its traceback, the driver's frames left out.
    let err = run(&d, &id, "def f():\n    return 1 / 0\nf()").await;
    assert_eq!(err["error"]["name"], "ZeroDivisionError", "{err}");
    assert_eq!(err["error"]["message"], "division by zero");
    let traceback = err["error"]["traceback"].as_str().unwrap();
    assert!(
        traceback.contains("in f") && traceback.contains("return 1 / 0"),
        "{traceback}"
    );
    assert!(
        !traceback.contains("<string>"),
        "driver frames leaked: {traceback}"
    );

    // Hostile output: fake answers on fd 1, and on every other descriptor the driver might hold,
    // each led by a partial line and a guessed nonce, do not replace the real answer.
    let forged = r#"{"stdout": "", "stderr": "", "result": "'forged'", "error": null, "interrupted": false, "execution_count": 99}"#;
    let hostile = format!(
        "import os\nfake = b'0' * 32 + b' ' + {forged:?}.encode() + b'\\n'\n\
         for fd in range(1, 10):\n    try:\n        os.write(fd, b'partial' + fake + b'\\n' + fake)\n    \
         except OSError:\n        pass\n'real'"
    );
    let answer = run(&d, &id, &hostile).await;
    assert_eq!(answer["result"], "'real'", "{answer}");
    assert!(answer["execution_count"] != json!(99), "{answer}");
    assert_eq!(
        run(&d, &id, "x").await["result"],
        "41",
        "the interpreter survived"
    );

    // A timeout interrupts the code; earlier names survive.
    let (status, slow) = run_code(
        &d,
        &id,
        json!({"code": "while True:\n    pass", "timeout_seconds": 2}),
    )
    .await;
    assert_eq!(status, 200, "{slow}");
    assert_eq!(
        (&slow["timed_out"], &slow["error"]["name"]),
        (&json!(true), &json!("KeyboardInterrupt")),
        "{slow}"
    );
    let after = run(&d, &id, "x").await;
    assert_eq!(
        (&after["result"], &after["restarted"]),
        (&json!("41"), &json!(false))
    );

    // Calls queue: the second waits for the first instead of interleaving with it.
    run(&d, &id, "log = []").await;
    let slow_call = run(
        &d,
        &id,
        "import time\nlog.append('a0')\ntime.sleep(2)\nlog.append('a1')",
    );
    let quick_call = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        run(&d, &id, "log.append('b')\nlog").await
    };
    let (_, quick) = tokio::join!(slow_call, quick_call);
    assert_eq!(quick["result"], "['a0', 'a1', 'b']", "{quick}");

    // A crash: this call says how, the next runs in a fresh interpreter and says so.
    let crash = run(&d, &id, "import os\nos._exit(3)").await;
    assert_eq!(crash["error"]["name"], "InterpreterExited", "{crash}");
    assert!(
        crash["error"]["message"]
            .as_str()
            .unwrap()
            .contains("code 3"),
        "{crash}"
    );
    let fresh = run(&d, &id, "x").await;
    assert_eq!(
        (
            &fresh["restarted"],
            &fresh["error"]["name"],
            &fresh["execution_count"]
        ),
        (&json!(true), &json!("NameError"), &json!(1)),
        "{fresh}"
    );

    // Code that ignores SIGINT: killed after the grace period, restarted next time.
    run(&d, &id, "y = 1").await;
    let (status, stuck) = run_code(
        &d,
        &id,
        json!({"code": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
               "timeout_seconds": 1}),
    )
    .await;
    assert_eq!(status, 200, "{stuck}");
    assert_eq!(
        (&stuck["timed_out"], &stuck["error"]["name"]),
        (&json!(true), &json!("TimeoutError")),
        "{stuck}"
    );
    let next = run(&d, &id, "'y' in dir()").await;
    assert_eq!(
        (&next["result"], &next["restarted"]),
        (&json!("False"), &json!(true))
    );

    // A reset ends it on purpose: the next call is fresh but no restart.
    run(&d, &id, "z = 1").await;
    let path = format!("/v1/sandboxes/{id}/code");
    let (status, _) = d.json(Method::DELETE, &path, Some(ALICE), None).await;
    assert_eq!(status, 204);
    let reset = run(&d, &id, "'z' in dir()").await;
    assert_eq!(
        (
            &reset["result"],
            &reset["restarted"],
            &reset["execution_count"]
        ),
        (&json!("False"), &json!(false), &json!(1)),
        "{reset}"
    );

    // Pause and resume: the interpreter comes back with the VM, its state and count with it.
    let before = run(&d, &id, "w = [1, 2]").await;
    let count = before["execution_count"].as_u64().unwrap();
    let pause = format!("/v1/sandboxes/{id}/pause");
    let (status, paused) = d.json(Method::POST, &pause, Some(ALICE), None).await;
    assert_eq!(status, 200, "{paused}");
    let (status, refused) = run_code(&d, &id, json!({"code": "1"})).await;
    assert_eq!(status, 409, "a paused sandbox runs no code: {refused}");
    let resume = format!("/v1/sandboxes/{id}/resume");
    let (status, resumed) = d.json(Method::POST, &resume, Some(ALICE), None).await;
    assert_eq!(status, 200, "{resumed}");
    let after_resume = run(&d, &id, "w.append(3); w").await;
    assert_eq!(
        (
            &after_resume["result"],
            &after_resume["restarted"],
            &after_resume["execution_count"]
        ),
        (&json!("[1, 2, 3]"), &json!(false), &json!(count + 1)),
        "{after_resume}\n{}",
        d.log_text()
    );

    // A fork: each child has its own copy of the parent's interpreter.
    let (status, forked) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(ALICE),
            Some(json!({"count": 2})),
        )
        .await;
    assert_eq!(status, 201, "{forked}\n{}", d.log_text());
    let children: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    for (n, child) in children.iter().enumerate() {
        let answer = run(&d, child, &format!("w.append({}); w", 10 + n)).await;
        assert_eq!(
            (
                &answer["result"],
                &answer["restarted"],
                &answer["execution_count"]
            ),
            (
                &json!(format!("[1, 2, 3, {}]", 10 + n)),
                &json!(false),
                &json!(count + 2)
            ),
            "child {child}: {answer}\n{}",
            d.log_text()
        );
    }
    let parent = run(&d, &id, "w").await;
    assert_eq!(parent["result"], json!("[1, 2, 3]"), "{parent}");
    for child in &children {
        let path = format!("/v1/sandboxes/{child}");
        let (status, _) = d.json(Method::DELETE, &path, Some(ALICE), None).await;
        assert_eq!(status, 204);
    }

    // The CLI: `hearth sandbox code ID [CODE]`, the code as an argument or on stdin (`-`); the last
    // expression's value printed after the output; a raise exits 1 with its traceback on stderr.
    let cli = |args: &'static [&'static str], stdin: &'static str| {
        let argv: Vec<&str> = ["code", id.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let (d, home) = (&d, &home);
        async move {
            let out = d.cli(home, ALICE, &argv, stdin.as_bytes()).await;
            (out.code, out.stdout, out.stderr)
        }
    };
    assert_eq!(
        cli(&["w"], "").await,
        (Some(0), "[1, 2, 3]\n".into(), String::new())
    );
    let (code, out, _) = cli(&["-"], "print('from stdin')\nlen(w)\n").await;
    assert_eq!((code, out.as_str()), (Some(0), "from stdin\n3\n"));
    let (code, out, err) = cli(&["1/0"], "").await;
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert!(err.contains("ZeroDivisionError"), "{err}");

    // A forced pause cuts a running call short: that call fails, and the first call after the
    // resume runs in a fresh interpreter and says so.
    let cut = run_code(
        &d,
        &id,
        json!({"code": "import time\ntime.sleep(30)", "timeout_seconds": 60}),
    );
    let forced = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let body = json!({"force": true});
        d.json(Method::POST, &pause, Some(ALICE), Some(body)).await
    };
    let ((cut_status, cut), (status, paused)) = tokio::join!(cut, forced);
    assert_eq!(status, 200, "{paused}");
    assert!(cut_status >= 500, "the cut call: {cut_status} {cut}");
    let (status, resumed) = d.json(Method::POST, &resume, Some(ALICE), None).await;
    assert_eq!(status, 200, "{resumed}");
    let fresh = run(&d, &id, "'w' in dir()").await;
    assert_eq!(
        (&fresh["result"], &fresh["restarted"]),
        (&json!("False"), &json!(true)),
        "{fresh}"
    );

    // Paused, then the daemon is killed: the next daemon's resume brings the interpreter back too.
    run(&d, &id, "u = 'kept'").await;
    let (status, paused) = d.json(Method::POST, &pause, Some(ALICE), None).await;
    assert_eq!(status, 200, "{paused}");
    d.kill9();
    let d = Daemon::start(&home, &[]);
    let (status, resumed) = d.json(Method::POST, &resume, Some(ALICE), None).await;
    assert_eq!(status, 200, "{resumed}\n{}", d.log_text());
    let after_crash = run(&d, &id, "u").await;
    assert_eq!(
        (&after_crash["result"], &after_crash["restarted"]),
        (&json!("'kept'"), &json!(false)),
        "{after_crash}\n{}",
        d.log_text()
    );

    // A daemon stopped (SIGTERM): the next re-attaches the running sandbox and its interpreter,
    // which the agent kept waiting. (`kill -9` leaves it waiting the same way: as above.)
    run(&d, &id, "v = 1").await;
    let d = d.restart(&home, &[], ALICE, &id).await;
    let after_restart = run(&d, &id, "'v' in dir()").await;
    assert_eq!(
        (&after_restart["result"], &after_restart["restarted"]),
        (&json!("True"), &json!(false)),
        "{after_restart}\n{}",
        d.log_text()
    );

    // Refusals, and an image without python3.
    let (status, bad) = run_code(&d, &id, json!({"code": "1", "language": "ruby"})).await;
    assert_eq!(
        (status, &bad["code"]),
        (400, &json!("unsupported_language")),
        "{bad}"
    );
    let (status, bad) = run_code(&d, &id, json!({"code": "1", "timeout_seconds": 0})).await;
    assert_eq!(status, 400, "{bad}");
    let (status, _) = run_code(&d, "sb-nosuch", json!({"code": "1"})).await;
    assert_eq!(status, 404);
    let (status, s) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox")})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let busybox = s["id"].as_str().unwrap();
    let (status, refused) = run_code(&d, busybox, json!({"code": "1"})).await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("invalid")),
        "{refused}"
    );
    assert!(
        refused["error"].as_str().unwrap().contains("python3"),
        "{refused}"
    );
    eprintln!("busybox refused: {refused}");
}
