//! Helpers for this crate's unit tests.

/// Whether the tests run as root (new namespaces, changing uids).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The value following `flag` in an argument list, for each occurrence.
pub fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}
