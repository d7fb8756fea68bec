//! hearth-testkit (work in progress).
