//! `POST /v1/forward?port=N`: a TCP connection to `127.0.0.1:N` inside the guest, relayed over the
//! request's HTTP/2 stream, so a guest port is reachable with no network path at all.
//!
//! The agent connects first (within [`CONNECT_TIMEOUT_MS`]) and answers 200 only once connected;
//! then the request body carries the bytes for the guest's socket and the answer body the bytes it
//! sends back, raw (no frames), in DATA frames of at most [`crate::MAX_PAYLOAD`] bytes, window
//! released as each end writes them out. End of the request body is the client's half-close
//! (`shutdown(SHUT_WR)` on the guest socket); end of the answer body is the guest socket's end of
//! file. A reset of the stream by either end aborts the connection.
//!
//! Failures to connect are ordinary agent errors: nothing listening is [`REFUSED_KIND`] (the guest
//! answered ECONNREFUSED); a connect that took too long or failed otherwise is `internal`.

use crate::ErrorKind;

/// How long the agent tries to connect to the guest port before answering with an error.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// The error kind of "nothing listens on that port in the guest" (ECONNREFUSED).
pub const REFUSED_KIND: ErrorKind = ErrorKind::NotFound;

/// Whether `port` can be forwarded (TCP port 0 names no port).
pub fn valid_port(port: u16) -> bool {
    port != 0
}
