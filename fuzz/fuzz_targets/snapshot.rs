#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| backer_fuzz::storage::snapshot(data));
