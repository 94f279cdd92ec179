//! Aggregation of model updates: streaming FedAvg and server optimisers,
//! robust rules, update codecs and differential privacy.
//!
//! Empty for now; it does no I/O and depends on `fleet-models` only for the
//! parameter layout.
