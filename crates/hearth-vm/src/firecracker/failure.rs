//! Judging how a Firecracker VM ended from its log and the guest console, because the exit status
//! alone lies: after `KVM_EXIT_INTERNAL_ERROR` Firecracker may exit 0. Pure: callers pass the text.

/// Markers of a failed VM, most specific first: the first marker found anywhere wins, so a KVM
/// internal error is reported over the generic error lines that follow it.
const MARKERS: &[&str] = &[
    "KVM_EXIT_INTERNAL_ERROR",
    "panicked at",
    // Firecracker's log level field with `show_level` on: `[id:thread:ERROR:file:line]` or
    // `[id:thread:ERROR]`.
    ":ERROR:",
    ":ERROR]",
    "Kernel panic - not syncing",
];

/// The line that shows why the VM failed, if any: searched in Firecracker's log, then its stderr,
/// then the guest console.
pub fn find_failure(sources: &[&str]) -> Option<String> {
    MARKERS.iter().find_map(|marker| {
        sources.iter().find_map(|text| {
            text.lines()
                .find(|line| line.contains(marker))
                .map(|line| line.trim().to_owned())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_FAILURE_LOG: &str = "\
2026-11-28T10:00:00.000000001 [vm1:main:INFO] Running Firecracker v1.17.0-dev
2026-11-28T10:00:00.100000000 [vm1:fc_api:INFO] The API server received a Put request on \"/actions\".
2026-11-28T10:00:00.200000000 [vm1:fc_vcpu 0:ERROR] Unexpected exit reason on vcpu run: KVM_EXIT_INTERNAL_ERROR
2026-11-28T10:00:00.200000100 [vm1:main:ERROR] Vmm is stopping: VcpuErr
2026-11-28T10:00:00.300000000 [vm1:main:INFO] Firecracker exiting successfully. exit_code=0
";

    #[test]
    fn a_kvm_internal_error_is_a_failure_even_with_exit_code_zero() {
        let failure = find_failure(&[KVM_FAILURE_LOG, ""]).unwrap();
        assert!(failure.contains("KVM_EXIT_INTERNAL_ERROR"), "{failure}");
    }

    #[test]
    fn error_lines_panics_and_guest_panics_are_failures() {
        let error = "[vm1:main:ERROR:src/firecracker/src/main.rs:100] Failed to open the log file";
        assert_eq!(find_failure(&[error]).as_deref(), Some(error));
        let panic = "thread 'fc_vcpu 0' panicked at src/vmm/src/vstate/vcpu.rs:10:5:";
        assert_eq!(find_failure(&["", panic]).as_deref(), Some(panic));
        let console = "[ 1.0] Kernel panic - not syncing: Attempted to kill init!";
        assert_eq!(find_failure(&["", "", console]).as_deref(), Some(console));
    }

    #[test]
    fn a_clean_run_has_no_failure() {
        let clean = "[vm1:main:INFO] Running Firecracker v1.17.0-dev\n\
                     [vm1:fc_vcpu 0:INFO] Received KVM_EXIT_SHUTDOWN signal\n\
                     [vm1:main:INFO] Vmm is stopping.\n";
        assert_eq!(find_failure(&[clean, "", ""]), None);
    }
}
