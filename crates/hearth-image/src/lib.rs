//! hearth-image (work in progress).
