//! End-to-end tests across crates live in this crate's `tests/` directory.
