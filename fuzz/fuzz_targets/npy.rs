//! NumPy arrays (token ids, palettes, data sets).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = igpt::npy::parse(data) {
        let _ = a.to_i64();
        let _ = a.to_f64();
    }
});
