#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| backer_fuzz::storage::key_file(data));
