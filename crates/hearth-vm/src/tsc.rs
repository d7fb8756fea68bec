//! Host TSC frequency, for `tsc_early_khz=` on a TCG guest's command line.
//!
//! Under TCG the guest's TSC is the host's TSC, but the microvm guest has no device it can calibrate
//! the TSC against quickly and hangs in calibration; telling it the frequency skips calibration, and a
//! wrong value makes guest timers run fast or slow. We measure `rdtsc` against `CLOCK_MONOTONIC_RAW`
//! (not slewed by NTP) over a few short windows and take the median; no dmesg access needed. The result
//! is cached in `$HEARTH_HOME/cache/tsc.json` keyed by the host's boot id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const WINDOW: Duration = Duration::from_millis(25);
const ROUNDS: usize = 3;

#[derive(Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    khz: u32,
}

/// The host TSC frequency in kHz, measured once per host boot.
pub fn host_tsc_khz(home: &Path) -> Result<u32, TscError> {
    let path = cache_path(home);
    let boot_id = crate::fsutil::host_boot_id();
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(cached) = serde_json::from_str::<Cached>(&text) {
            if cached.boot_id == boot_id && cached.khz > 0 {
                return Ok(cached.khz);
            }
        }
    }
    let khz = measure_tsc_khz()?;
    let json = serde_json::to_vec(&Cached { boot_id, khz }).expect("plain struct serializes");
    crate::fsutil::write_atomic(&path, &json).map_err(|source| TscError::Cache { path, source })?;
    Ok(khz)
}

fn cache_path(home: &Path) -> PathBuf {
    home.join("cache").join("tsc.json")
}

/// Measures the TSC frequency now (~75 ms).
pub fn measure_tsc_khz() -> Result<u32, TscError> {
    if !invariant_tsc() {
        return Err(TscError::NotInvariant);
    }
    let mut samples: Vec<f64> = (0..ROUNDS)
        .map(|_| one_window())
        .collect::<Result<_, _>>()?;
    samples.sort_by(f64::total_cmp);
    let khz = samples[ROUNDS / 2].round();
    if !(100_000.0..=10_000_000.0).contains(&khz) {
        return Err(TscError::Implausible(khz as u64));
    }
    Ok(khz as u32)
}

/// kHz over one window; the clock is read on both sides of each `rdtsc` pair so that a preemption
/// between the two reads shows up as a wider bracket rather than as a wrong frequency.
fn one_window() -> Result<f64, TscError> {
    let (t0, c0) = paired_read()?;
    std::thread::sleep(WINDOW);
    let (t1, c1) = paired_read()?;
    let nanos = (t1 - t0) as f64;
    Ok((c1.wrapping_sub(c0)) as f64 / nanos * 1e6)
}

/// (monotonic-raw ns, tsc): the reading whose clock bracket was tightest out of a few tries.
fn paired_read() -> Result<(i128, u64), TscError> {
    let mut best: Option<(i128, i128, u64)> = None;
    for _ in 0..16 {
        let before = monotonic_raw_ns()?;
        let tsc = rdtsc()?;
        let after = monotonic_raw_ns()?;
        let width = after - before;
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, before + width / 2, tsc));
        }
    }
    let (_, at, tsc) = best.expect("at least one sample");
    Ok((at, tsc))
}

fn monotonic_raw_ns() -> Result<i128, TscError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) } != 0 {
        return Err(TscError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128)
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> Result<u64, TscError> {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    Ok(unsafe { core::arch::x86_64::_rdtsc() })
}

#[cfg(not(target_arch = "x86_64"))]
fn rdtsc() -> Result<u64, TscError> {
    Err(TscError::Unsupported)
}

/// A TSC that ticks at a constant rate regardless of frequency scaling and sleep states; without it
/// there is no single frequency to tell the guest.
fn invariant_tsc() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    flags.split_whitespace().any(|f| f == "constant_tsc")
}

#[derive(Debug, thiserror::Error)]
pub enum TscError {
    #[error("the host TSC is not constant-rate (no constant_tsc in /proc/cpuinfo): TCG guests cannot be \
             given a TSC frequency; use KVM on this host")]
    NotInvariant,
    #[error(
        "measured TSC frequency {0} kHz is implausible; the host may be heavily loaded, try again"
    )]
    Implausible(u64),
    #[error("reading CLOCK_MONOTONIC_RAW: {0}")]
    Clock(std::io::Error),
    #[error("TSC measurement is only implemented on x86-64 hosts")]
    Unsupported,
    #[error("writing TSC cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's own calibration, when this host's dmesg shows it ("tsc: Detected 2300.000 MHz").
    fn kernel_reported_khz() -> Option<f64> {
        let out = std::process::Command::new("dmesg").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .rev()
            .find(|l| l.contains("tsc: Refined TSC clocksource calibration"))
            .or_else(|| text.lines().find(|l| l.contains("tsc: Detected")))?;
        let mhz: f64 = line.split_whitespace().rev().nth(1)?.parse().ok()?;
        Some(mhz * 1000.0)
    }

    #[test]
    fn measurement_is_plausible_and_stable() {
        let a = measure_tsc_khz().unwrap() as f64;
        let b = measure_tsc_khz().unwrap() as f64;
        assert!((500_000.0..6_000_000.0).contains(&a), "{a} kHz");
        assert!(
            (a - b).abs() / a < 0.002,
            "two measurements disagree: {a} vs {b} kHz"
        );
        if let Some(kernel) = kernel_reported_khz() {
            assert!(
                (a - kernel).abs() / kernel < 0.002,
                "measured {a} kHz, kernel says {kernel} kHz"
            );
        }
    }

    #[test]
    fn cached_value_is_reused_within_a_boot() {
        let home = tempfile::tempdir().unwrap();
        let first = host_tsc_khz(home.path()).unwrap();
        let planted = Cached {
            boot_id: crate::fsutil::host_boot_id(),
            khz: 1_234_567,
        };
        std::fs::write(
            cache_path(home.path()),
            serde_json::to_vec(&planted).unwrap(),
        )
        .unwrap();
        assert_eq!(host_tsc_khz(home.path()).unwrap(), 1_234_567);
        let stale = Cached {
            boot_id: "another-boot".into(),
            khz: 1_234_567,
        };
        std::fs::write(cache_path(home.path()), serde_json::to_vec(&stale).unwrap()).unwrap();
        let remeasured = host_tsc_khz(home.path()).unwrap() as f64;
        assert!((remeasured - first as f64).abs() / (first as f64) < 0.002);
    }
}
