//! hearth-sandbox (work in progress).
