//! Template mode without a VM: the agent's real session code on a stream that outlives sessions (as
//! the virtio-serial port), with a recording late init in place of PID 1's (which sets the clock,
//! reseeds the CRNG and mounts disks: only a real guest can run it). Checks what the host relies on:
//! no READY before RESUME, READY after it, RESUME applied once per agent life, a failed late init
//! retried by the next RESUME, and RESUME ignored by a cold-booted agent.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hearth_agent::resume::LateInit;
use hearth_agent::{Agent, AgentConfig, ExitProcess};
use hearth_proto::handshake::{self, Resume};

/// Records the RESUMEs it applied; takes `delay` (like a real late init waiting for disks) and
/// fails the first `failures` times.
#[derive(Default)]
struct RecordingLateInit {
    applied: Mutex<Vec<Resume>>,
    failures: Mutex<u32>,
    delay: Duration,
}

impl LateInit for RecordingLateInit {
    fn apply(&self, resume: &Resume) -> Result<(), String> {
        std::thread::sleep(self.delay);
        let mut failures = self.failures.lock().unwrap();
        if *failures > 0 {
            *failures -= 1;
            return Err("no virtio disks after 10s".into());
        }
        self.applied.lock().unwrap().push(resume.clone());
        Ok(())
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        root: PathBuf::from("/"),
        exec_init_program: PathBuf::from(AGENT),
        power: Arc::new(ExitProcess),
    }
}

/// Serves `agent` for ever on one end of a socket pair (as on the virtio-serial port); returns the
/// host end.
fn serve_on_stream(agent: Arc<Agent>) -> UnixStream {
    let (host_end, agent_end) = UnixStream::pair().unwrap();
    let port = hearth_agent::stream::FdStream::new(agent_end.into()).unwrap();
    tokio::spawn(hearth_agent::session::serve_port(agent, port));
    host_end
}

fn resume(hostname: &str, seed_byte: u8) -> Resume {
    Resume {
        unix_time_ns: 1_700_000_000_000_000_000,
        seed: [seed_byte; 32],
        hostname: hostname.into(),
    }
}

/// Everything the guest writes within `window` (the stream must be blocking).
async fn read_for(stream: &UnixStream, window: Duration) -> String {
    let mut stream = stream.try_clone().unwrap();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("reading the guest's answers: {e}"),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_agent_answers_hello_only_after_resume_and_applies_it_once() {
    let late_init = Arc::new(RecordingLateInit {
        delay: Duration::from_millis(300),
        ..RecordingLateInit::default()
    });
    let host = serve_on_stream(Agent::awaiting_resume(config(), late_init.clone()));

    // A host that forgets RESUME (or the template builder, which only waits for WAITING) gets no READY.
    (&host)
        .write_all(handshake::hello_line("0a0a").as_bytes())
        .unwrap();
    let seen = read_for(&host, Duration::from_millis(700)).await;
    assert!(seen.contains("HEARTH-AGENT/1 WAITING"), "{seen:?}");
    assert!(!seen.contains("READY"), "answered before RESUME: {seen:?}");
    assert!(late_init.applied.lock().unwrap().is_empty());

    // RESUME, then the client's repeated HELLOs (some arrive while the late init still runs).
    let first = resume("vm-one", 1);
    (&host)
        .write_all(handshake::resume_line(&first).as_bytes())
        .unwrap();
    let client = connect_on(&host).await;
    let info = client.info().await.expect("info after RESUME");
    assert_eq!(info.protocol, hearth_proto::PROTOCOL_MAJOR);
    assert_eq!(
        *late_init.applied.lock().unwrap(),
        std::slice::from_ref(&first)
    );
    drop(client);

    // A later session (new host, same stream) with its own RESUME: answered, not applied again.
    (&host)
        .write_all(handshake::resume_line(&resume("vm-two", 2)).as_bytes())
        .unwrap();
    let client = connect_on(&host).await;
    client.info().await.expect("info in a later session");
    assert_eq!(*late_init.applied.lock().unwrap(), [first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_late_init_answers_nothing_and_the_next_resume_retries() {
    let late_init = Arc::new(RecordingLateInit {
        failures: Mutex::new(1),
        ..RecordingLateInit::default()
    });
    let host = serve_on_stream(Agent::awaiting_resume(config(), late_init.clone()));
    let attempt = resume("vm", 3);
    let lines = handshake::resume_line(&attempt) + &handshake::hello_line("0b0b");
    (&host).write_all(lines.as_bytes()).unwrap();
    let seen = read_for(&host, Duration::from_millis(700)).await;
    assert!(
        !seen.contains("READY"),
        "answered after a failed RESUME: {seen:?}"
    );
    assert!(late_init.applied.lock().unwrap().is_empty());

    (&host)
        .write_all(handshake::resume_line(&attempt).as_bytes())
        .unwrap();
    let client = connect_on(&host).await;
    client.info().await.expect("info after the retried RESUME");
    assert_eq!(*late_init.applied.lock().unwrap(), [attempt]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_booted_agent_ignores_resume_and_answers_hello() {
    let host = serve_on_stream(Agent::new(config()));
    (&host)
        .write_all(handshake::resume_line(&resume("ignored", 4)).as_bytes())
        .unwrap();
    let client = connect_on(&host).await;
    client.info().await.expect("info from a cold agent");
}
