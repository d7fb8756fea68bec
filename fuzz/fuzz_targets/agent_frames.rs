//! Fuzzes the exec frame codec and the agent's JSON answers, both written by the guest (which may be
//! compromised). Bytes arrive in chunks of fuzzer-chosen sizes; the decoder must not panic, must never
//! return a payload over `MAX_PAYLOAD`, must buffer no more than it was given, and every frame it
//! returns must encode back to the same bytes. Each payload is also parsed as every JSON answer the
//! host reads from the agent.
//!
//! Run: `cd fuzz && cargo +nightly fuzz run agent_frames -- -max_total_time=60`
#![no_main]

use hearth_proto::{
    AgentError, AgentInfo, DirListing, ExecStarted, ExitStatus, FileStat, FrameDecoder, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = (*chunk as usize).max(1);
    let mut decoder = FrameDecoder::new();
    let mut given = 0;
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        given += piece.len();
        assert!(decoder.buffered() <= given);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.payload.len() <= MAX_PAYLOAD);
                    let encoded = frame.encode().expect("a decoded frame encodes");
                    let mut again = FrameDecoder::new();
                    again.push(&encoded);
                    let same = again.next_frame().unwrap().unwrap();
                    assert_eq!((same.kind, &same.payload), (frame.kind, &frame.payload));
                    let _ = frame.parse_json::<ExecStarted>();
                    let _ = frame.parse_json::<ExitStatus>();
                    let _ = serde_json::from_slice::<AgentError>(&frame.payload);
                    let _ = serde_json::from_slice::<AgentInfo>(&frame.payload);
                    let _ = serde_json::from_slice::<FileStat>(&frame.payload);
                    let _ = serde_json::from_slice::<DirListing>(&frame.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
