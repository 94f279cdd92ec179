#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fleet_e2e::fuzz::drift_summary(data));
