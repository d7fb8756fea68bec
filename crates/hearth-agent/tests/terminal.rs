//! Execs on a pseudo-terminal (`tty` in the request) through the real agent and the real host
//! client (no VM): the command's stdio is a terminal of the requested size, output is one stream,
//! resizes reach the foreground job as SIGWINCH, ^C typed into the terminal interrupts the
//! foreground job (not the shell), and the exec ends like any other.

mod common;

use std::time::Duration;

use common::*;
use hearth_vm::channel::{ExecHandle, ExecOutput, ExecStdin, TtySize};

/// Reads output until `needle` appears (after what earlier calls consumed), up to 20 s.
struct Screen {
    seen: String,
    consumed: usize,
}

impl Screen {
    async fn expect(&mut self, exec: &mut ExecHandle, needle: &str) {
        let read = async {
            loop {
                if let Some(at) = self.seen[self.consumed..].find(needle) {
                    self.consumed += at + needle.len();
                    return;
                }
                match exec.next_output().await.expect("exec output") {
                    Some(ExecOutput::Stdout(data)) => {
                        self.seen.push_str(&String::from_utf8_lossy(&data))
                    }
                    Some(ExecOutput::Stderr(data)) => panic!(
                        "a terminal exec sent stderr separately: {:?}",
                        String::from_utf8_lossy(&data)
                    ),
                    None => panic!("exec ended while waiting for {needle:?}:\n{}", self.seen),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .is_err()
        {
            panic!(
                "no {needle:?} within 20 s; the terminal showed:\n{}",
                self.seen
            );
        }
    }
}

async fn type_line(stdin: &mut ExecStdin, line: &str) {
    stdin.write(line.as_bytes()).await.expect("typing");
}

#[tokio::test]
async fn a_shell_on_a_terminal_sees_its_size_resizes_and_interrupts() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&["/bin/busybox", "sh"]);
    request.env.push("PS1=$ ".into());
    request.stdin = true;
    request.tty = Some(TtySize { rows: 24, cols: 80 });
    let mut exec = client
        .exec(request)
        .await
        .expect("starting a shell on a tty");
    let mut stdin = exec.take_stdin().unwrap();
    let mut screen = Screen {
        seen: String::new(),
        consumed: 0,
    };

    // Markers are built by the shell ($((...))) so that the echo of the typed line never matches.
    type_line(
        &mut stdin,
        "tty; echo tty-$((6*7)); stty size; echo err >&2\n",
    )
    .await;
    screen.expect(&mut exec, "tty-42").await;
    screen.expect(&mut exec, "24 80").await;
    screen.expect(&mut exec, "err").await;
    let tty_line = screen.seen.lines().find(|l| l.starts_with("/dev/pts/"));
    assert!(
        tty_line.is_some(),
        "`tty` names no device:\n{}",
        screen.seen
    );

    // A resize reaches the foreground job as SIGWINCH and shows in the terminal's size.
    let on_winch = "trap \"echo winch-\\$((2+3)); stty size; exit\" WINCH";
    let line = format!("sh -c '{on_winch}; echo wait-$((1+1)); while :; do sleep 0.1; done'\n");
    type_line(&mut stdin, &line).await;
    screen.expect(&mut exec, "wait-2").await;
    exec.resize(TtySize {
        rows: 50,
        cols: 132,
    })
    .await
    .expect("resize");
    screen.expect(&mut exec, "winch-5").await;
    screen.expect(&mut exec, "50 132").await;

    // ^C interrupts the foreground job; the shell lives on.
    // A duration no other test uses: the check looks at every process on this host.
    type_line(&mut stdin, "sleep 100.3125\n").await;
    wait_until_present(&["sleep", "100.3125"]).await;
    type_line(&mut stdin, "\x03").await;
    let left = wait_until_gone(&["sleep", "100.3125"], Duration::from_secs(10)).await;
    assert!(
        left.is_empty(),
        "^C did not interrupt `sleep 100.3125`: {left:?}"
    );
    type_line(&mut stdin, "echo alive-$((4+4))\n").await;
    screen.expect(&mut exec, "alive-8").await;

    type_line(&mut stdin, "exit 3\n").await;
    let status = tokio::time::timeout(Duration::from_secs(20), exec.wait())
        .await
        .expect("the shell exits within 20 s")
        .expect("exit status");
    assert_eq!(status.code, Some(3));
}

#[tokio::test]
async fn a_user_owns_its_terminal() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&["/bin/busybox", "sh", "-c", "stat -c %u $(tty)"]);
    request.user = Some("1234".into());
    request.tty = Some(TtySize { rows: 24, cols: 80 });
    let result = run(&client, request).await;
    assert_eq!(text(&result.stdout), "1234\r\n");
    assert_eq!(result.status.code, Some(0));
}

#[tokio::test]
async fn resizing_an_exec_without_a_terminal_is_refused() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let exec = client
        .exec(request(&["sleep", "5"]))
        .await
        .expect("starting sleep");
    let err = exec
        .resize(TtySize { rows: 1, cols: 1 })
        .await
        .expect_err("no terminal to resize");
    assert!(err.to_string().contains("no terminal"), "{err}");
    drop(exec);
    let err = client
        .resize(9999, TtySize { rows: 1, cols: 1 })
        .await
        .expect_err("no such exec");
    assert!(err.to_string().contains("not running"), "{err}");
}
