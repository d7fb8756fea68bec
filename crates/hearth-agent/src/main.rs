//! hearth-agent: the guest's PID 1 (work in progress).
fn main() {}
