//! PID 1's orphan reaper. Processes orphaned outside any exec namespace are reparented to the agent
//! and must be reaped; exec-inits are the agent's own children whose status their exec task is
//! waiting for, so they are left alone (peeked at with `WNOWAIT`, never reaped here).

use std::sync::Arc;
use std::time::Duration;

use crate::Agent;

pub async fn reap_orphans(agent: Arc<Agent>) {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            crate::log!("cannot watch SIGCHLD ({e}); reaping orphans once a second");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        match sigchld.as_mut() {
            Some(signal) => {
                tokio::select! {
                    _ = signal.recv() => {}
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        reap_once(&agent);
    }
}

fn reap_once(agent: &Agent) {
    agent.execs.with_exec_pids(|is_exec_init| loop {
        // SAFETY: waitid into a zeroed siginfo_t; WNOWAIT leaves the child waitable.
        let pid = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) < 0
            {
                return;
            }
            info.si_pid()
        };
        if pid == 0 || is_exec_init(pid) {
            // Nothing exited, or an exec-init whose task will reap it (later orphans wait a tick).
            return;
        }
        // SAFETY: reaping a specific, already exited child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    })
}
