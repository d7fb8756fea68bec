//! Fuzzes layer application: arbitrary bytes, split into two layers, applied to a fresh staging
//! directory. Whatever the input, application must not panic and must never create anything outside
//! the staging root (a sibling directory stands in for "the rest of the machine"). The limits are
//! realistic in shape (extension headers capped, per-path bookkeeping bounded by bytes, written bytes
//! counted) and small enough that a bomb the fuzzer finds is caught quickly: the staged tree may never
//! hold more file bytes than the limit allows.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run layer_apply -- -max_total_time=60`
#![no_main]

use hearth_image::layer::{Limits, Staging};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let limits = Limits {
        max_total_bytes: 16 << 20,
        max_entries: 10_000,
        max_path_len: 4096,
        max_extension_header: 64 << 10,
        max_bookkeeping_bytes: 1 << 20,
    };
    // The first two bytes choose where the first layer ends, so whiteouts can meet lower layers.
    let (first, second) = match data {
        [a, b, rest @ ..] => {
            let split = (u16::from_le_bytes([*a, *b]) as usize).min(rest.len());
            rest.split_at(split)
        }
        _ => (data, &[][..]),
    };
    let mut staging = Staging::new(&root, limits).expect("staging");
    if staging.apply(first).is_ok() {
        let _ = staging.apply(second);
    }
    let _ = staging.finish();
    let written = tree_bytes(&root);
    assert!(
        written <= limits.max_total_bytes,
        "{written} file bytes staged past the {}-byte limit",
        limits.max_total_bytes
    );
    let escaped: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "root" && n != "outside")
        .collect();
    assert!(
        escaped.is_empty(),
        "entries appeared beside the staging root: {escaped:?}"
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside"
    );
});

/// Apparent size of every regular file below `dir`, each inode once (hard links share their bytes;
/// symlinks are not followed).
fn tree_bytes(dir: &std::path::Path) -> u64 {
    fn walk(dir: &std::path::Path, seen: &mut std::collections::HashSet<u64>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += walk(&e.path(), seen),
                Ok(m) if m.is_file() && seen.insert(m.ino()) => total += m.len(),
                _ => {}
            }
        }
        total
    }
    walk(dir, &mut std::collections::HashSet::new())
}
