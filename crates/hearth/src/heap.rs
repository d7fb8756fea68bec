//! How hearth's long-lived processes (`serve`, `gateway`, `operator`, `mcp`) keep the C allocator
//! from holding on to memory they freed.
//!
//! glibc gives threads their own malloc arenas and returns an arena's free pages to the kernel
//! only from the top of its heap. A daemon whose worker and blocking threads buffer exec output,
//! file transfers and registry layers in turn leaves each arena holding megabytes of freed pages:
//! the soak saw the daemon's private memory climb by ~55 MiB in a minute of churn and stay there.
//! So daemons cap the number of arenas and trim every arena periodically (`malloc_trim` releases
//! free pages anywhere in a heap, not just at its top). Nothing is freed early: only memory the
//! allocator already holds free goes back.

use std::time::Duration;

/// Arenas a daemon may create: its threads share them (they seldom allocate at the same instant).
const ARENA_MAX: libc::c_int = 4;
/// How often free pages go back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Caps the allocator's arenas and starts the trimming thread. Call once, early in a daemon.
pub fn bound_retention() {
    // SAFETY: mallopt and malloc_trim only tune and walk the allocator's own state.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
    let spawned = std::thread::Builder::new()
        .name("hearth-heap-trim".into())
        .spawn(|| loop {
            std::thread::sleep(TRIM_EVERY);
            // SAFETY: as above.
            unsafe { libc::malloc_trim(0) };
        });
    if let Err(e) = spawned {
        tracing::warn!("not trimming the heap: {e}");
    }
}
