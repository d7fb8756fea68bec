//! hearth-proto: the wire types of the agent protocol shared by the host (`hearth-vm`'s channel) and
//! the guest agent (`hearth-agent`). No I/O: message types, the body frame codec, the handshake
//! lines and the request routes. The protocol document follows.
//!
#![doc = include_str!("../PROTOCOL.md")]

pub mod error;
pub mod exec;
pub mod files;
pub mod frame;
pub mod handshake;
pub mod net;
pub mod ports;
pub mod request;

pub use error::{AgentError, ErrorKind};
pub use exec::{
    ExecEntry, ExecList, ExecRequest, ExecStarted, ExitStatus, TtySize, MAX_EXEC_LABEL,
};
pub use files::{AgentInfo, BootMarks, DirEntry, DirListing, FileKind, FileStat};
pub use frame::{Frame, FrameDecoder, FrameError, FrameKind, MAX_PAYLOAD};
pub use handshake::{Resume, PROTOCOL_MAJOR};
pub use request::AgentRequest;

/// Name of the virtio-serial port the agent serves on (QEMU).
pub const VIRTIO_PORT_NAME: &str = "hearth.agent";

/// AF_VSOCK port the agent listens on (Firecracker).
pub const VSOCK_PORT: u32 = 1024;

/// HTTP/2 settings both ends use. The stream window bounds how much output of one exec (or one file
/// transfer) can be in flight; the connection window bounds all of them together. Large enough for
/// throughput over a slow virtio-serial link, small enough to keep memory bounded on both sides.
pub mod tuning {
    pub const HTTP2_STREAM_WINDOW: u32 = 1024 * 1024;
    pub const HTTP2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
    pub const HTTP2_MAX_FRAME: u32 = 64 * 1024;
}
