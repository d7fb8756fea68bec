//! Fuzzes image reference parsing (`hearth_image::Reference::parse`), which sees every reference a
//! tenant sends. Whatever the input, parsing must not panic, and a parsed reference printed back must
//! parse to the same reference (what the daemon logs and stores is what it pulls).
//!
//! Run: `cd fuzz && cargo +nightly fuzz run reference_parse -- -max_total_time=60`
#![no_main]

use hearth_image::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Reference::parse(input) else {
        return;
    };
    let shown = parsed.to_string();
    let again = Reference::parse(&shown)
        .unwrap_or_else(|e| panic!("{input:?} parsed, but its display {shown:?} does not: {e}"));
    assert_eq!(again, parsed, "{input:?} -> {shown:?} changed on re-parse");
});
