//! hearth-proto (work in progress).
