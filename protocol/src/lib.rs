//! Wire protocol between the coordinator and edge agents.
//!
//! This crate will hold the versioned message types (encoded with postcard),
//! the length-delimited framing used on QUIC streams and the chunked transfer
//! of model artifacts and updates. It is the only place wire types are
//! defined; every other crate imports them from here.
