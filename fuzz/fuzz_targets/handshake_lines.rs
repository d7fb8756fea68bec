//! Fuzzes the host side of the agent handshake: the line reader that splits the guest's serial or
//! vsock stream into lines (in fuzzer-chosen chunk sizes) and the parser for each line, plus the
//! HTTP/2 preface check. Nothing may panic, and no line handed out may be longer than the reader's
//! bound plus the chunk that completed it (an overlong line is dropped, never buffered whole).
//!
//! Run: `cd fuzz && cargo +nightly fuzz run handshake_lines -- -max_total_time=60`
#![no_main]

use hearth_proto::handshake::{parse_line, LineBuffer, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = (*chunk as usize).max(1);
    let mut lines = LineBuffer::new();
    for piece in stream.chunks(chunk) {
        lines.push(piece);
        let _ = lines.preface();
        while let Some(line) = lines.next_line() {
            assert!(line.len() <= MAX_LINE + chunk, "a {}-byte line", line.len());
            let _ = parse_line(&line);
        }
    }
    let _ = lines.take_rest();
});
