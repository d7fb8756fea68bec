//! hearth-vm (work in progress).
