//! Fuzzes the egress proxy's server-name reader (TLS ClientHello SNI / HTTP Host) on what a
//! hostile guest sends first, fed the way the proxy feeds it: growing prefixes in fuzzer-chosen
//! steps. Nothing may panic; a name found is a plausible host name (ASCII, at most 253 bytes,
//! lowercase); once decided, longer input never goes back to `NeedMore`; past the peek bound
//! the answer is always decided.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run sni -- -max_total_time=60`
#![no_main]

use hearth_net::sni::{server_name, ServerName, MAX_PEEK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(*step).max(1) * 7;
    let mut decided = false;
    let mut end = 0;
    loop {
        end = (end + step).min(stream.len());
        match server_name(&stream[..end]) {
            ServerName::NeedMore => assert!(!decided || end > MAX_PEEK, "undecided again"),
            ServerName::Found(name) => {
                assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
                assert!(
                    name.is_ascii() && name == name.to_ascii_lowercase(),
                    "{name:?}"
                );
                decided = true;
            }
            ServerName::Absent => decided = true,
        }
        if end >= MAX_PEEK {
            assert!(server_name(&stream[..end]) != ServerName::NeedMore);
        }
        if end == stream.len() {
            break;
        }
    }
});
