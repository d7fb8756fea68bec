//! Fuzzes layer application: arbitrary bytes, split into two layers, applied to a fresh staging
//! directory. Whatever the input, application must not panic and must never create anything outside
//! the staging root (a sibling directory stands in for "the rest of the machine").
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
