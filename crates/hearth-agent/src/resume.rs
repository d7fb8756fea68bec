//! The RESUME gate of a template VM's agent: until a RESUME line has been applied, the handshake
//! answers no HELLO (the guest has no disks, workload root, clock or fresh entropy yet). What
//! applying means is behind [`LateInit`] (the real one, which touches the kernel, is PID 1's late
//! init); this module only decides when it runs: once per agent life, one session at a time.
//!
//! Once the gate is open (a cold boot, or a template VM already resumed), a RESUME line means the
//! whole running VM was saved and restored (a paused sandbox resumed, or a forked sandbox's copy
//! started): its wall clock is as old as the save and its CRNG state is the saved one. The gate
//! then applies the line's clock and entropy through its [`Refresh`], at most once per session,
//! and its hostname where it differs from the guest's (a copy's own; a resumed sandbox is sent the
//! one it had, so the line's meaning for it is unchanged); a gate without a `Refresh` (outside a
//! VM) ignores it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hearth_proto::Resume;

/// The guest state a template VM sets up only after RESUME (clock, entropy, hostname, disks...).
pub trait LateInit: Send + Sync + 'static {
    /// Applies `resume`. Blocking (it may wait for devices); called on a blocking thread. `Err`:
    /// the guest is not ready; the gate stays closed and a later RESUME line tries again.
    fn apply(&self, resume: &Resume) -> Result<(), String>;
}

/// What a RESUME line to an already running agent applies: the host's wall clock and fresh
/// entropy of a VM restored from its own saved state (the real one is PID 1's).
pub trait Refresh: Send + Sync + 'static {
    /// Sets the clock from `resume`, mixes its seed in (reseeding the CRNG) and takes its
    /// hostname if the guest's differs. Blocking.
    fn refresh(&self, resume: &Resume) -> Result<(), String>;
}

/// Whether HELLO may be answered yet, and what opens the gate.
pub struct ResumeGate {
    open: AtomicBool,
    /// Held while applying, so concurrent sessions (vsock) apply at most one RESUME.
    late_init: tokio::sync::Mutex<Option<Arc<dyn LateInit>>>,
    refresh: Option<Arc<dyn Refresh>>,
    warned: AtomicBool,
}

/// What [`ResumeGate::resume`] did with a RESUME line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// This RESUME ran the late init; HELLO may be answered now.
    Applied,
    /// The gate was already open: the VM was restored from its own saved state, and the clock and
    /// entropy were refreshed.
    Refreshed,
    /// The gate was already open and has no [`Refresh`]: nothing done.
    Ignored,
}

impl ResumeGate {
    /// A cold-booted agent: HELLO is answered at once and RESUME lines are ignored.
    pub fn open() -> ResumeGate {
        ResumeGate {
            open: AtomicBool::new(true),
            late_init: tokio::sync::Mutex::new(None),
            refresh: None,
            warned: AtomicBool::new(false),
        }
    }

    /// A template's agent: HELLO waits until a RESUME has been applied with `late_init`.
    pub fn closed(late_init: Arc<dyn LateInit>) -> ResumeGate {
        ResumeGate {
            open: AtomicBool::new(false),
            late_init: tokio::sync::Mutex::new(Some(late_init)),
            refresh: None,
            warned: AtomicBool::new(false),
        }
    }

    /// Refreshes clock and entropy with `refresh` on a RESUME line once the gate is open.
    pub fn with_refresh(mut self, refresh: Arc<dyn Refresh>) -> ResumeGate {
        self.refresh = Some(refresh);
        self
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Applies `resume` if the gate is closed (then opens it); refreshes clock and entropy from it
    /// if the gate is open and has a [`Refresh`]; ignores it otherwise.
    pub async fn resume(&self, resume: Resume) -> Result<Resumed, String> {
        let mut pending = self.late_init.lock().await;
        let Some(late_init) = pending.clone() else {
            let Some(refresh) = self.refresh.clone() else {
                return Ok(Resumed::Ignored);
            };
            tokio::task::spawn_blocking(move || refresh.refresh(&resume))
                .await
                .map_err(|e| format!("refreshing clock and entropy panicked: {e}"))??;
            return Ok(Resumed::Refreshed);
        };
        tokio::task::spawn_blocking(move || late_init.apply(&resume))
            .await
            .map_err(|e| format!("applying RESUME panicked: {e}"))??;
        *pending = None;
        self.open.store(true, Ordering::Release);
        Ok(Resumed::Applied)
    }

    /// Whether a HELLO that arrived before RESUME should be reported (the first one only: the host
    /// repeats HELLO every 250 ms).
    pub fn first_early_hello(&self) -> bool {
        !self.warned.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it applied; fails while `failures` is non-zero.
    #[derive(Default)]
    struct Recorder {
        applied: Mutex<Vec<String>>,
        failures: Mutex<u32>,
    }

    impl LateInit for Recorder {
        fn apply(&self, resume: &Resume) -> Result<(), String> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(format!("no disks for {}", resume.hostname));
            }
            self.applied.lock().unwrap().push(resume.hostname.clone());
            Ok(())
        }
    }

    fn resume(hostname: &str) -> Resume {
        Resume {
            unix_time_ns: 1,
            seed: [7; 32],
            hostname: hostname.into(),
        }
    }

    #[tokio::test]
    async fn applies_the_first_resume_only() {
        let recorder = Arc::new(Recorder::default());
        let gate = ResumeGate::closed(recorder.clone());
        assert!(!gate.is_open());
        assert_eq!(gate.resume(resume("one")).await, Ok(Resumed::Applied));
        assert!(gate.is_open());
        assert_eq!(gate.resume(resume("two")).await, Ok(Resumed::Ignored));
        assert_eq!(*recorder.applied.lock().unwrap(), ["one"]);
    }

    #[tokio::test]
    async fn a_failed_resume_keeps_the_gate_closed_for_a_retry() {
        let recorder = Arc::new(Recorder::default());
        *recorder.failures.lock().unwrap() = 1;
        let gate = ResumeGate::closed(recorder.clone());
        let error = gate.resume(resume("vm")).await.unwrap_err();
        assert!(error.contains("no disks for vm"), "{error}");
        assert!(!gate.is_open());
        assert_eq!(gate.resume(resume("vm")).await, Ok(Resumed::Applied));
        assert!(gate.is_open());
    }

    #[derive(Default)]
    struct Refreshes(Mutex<Vec<u64>>);

    impl Refresh for Refreshes {
        fn refresh(&self, resume: &Resume) -> Result<(), String> {
            self.0.lock().unwrap().push(resume.unix_time_ns);
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_open_gate_refreshes_clock_and_entropy_on_resume() {
        let refreshes = Arc::new(Refreshes::default());
        let gate = ResumeGate::open().with_refresh(refreshes.clone());
        assert_eq!(gate.resume(resume("x")).await, Ok(Resumed::Refreshed));
        assert_eq!(*refreshes.0.lock().unwrap(), [1]);
        // A template's gate applies the late init first; the next RESUME (a later live resume)
        // refreshes.
        let recorder = Arc::new(Recorder::default());
        let gate = ResumeGate::closed(recorder.clone()).with_refresh(refreshes.clone());
        assert_eq!(gate.resume(resume("one")).await, Ok(Resumed::Applied));
        assert_eq!(gate.resume(resume("one")).await, Ok(Resumed::Refreshed));
        assert_eq!(*recorder.applied.lock().unwrap(), ["one"]);
        assert_eq!(refreshes.0.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_open_gate_ignores_resume() {
        let gate = ResumeGate::open();
        assert!(gate.is_open());
        assert_eq!(gate.resume(resume("x")).await, Ok(Resumed::Ignored));
        assert!(gate.first_early_hello());
        assert!(!gate.first_early_hello());
    }
}
