//! A safetensors file as igpt opens it, then every tensor read.
#![no_main]
use igpt::formats::{Bytes, SafetensorsFile, TensorSource};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes(Path::new("fuzz.safetensors"), Bytes::Owned(data.to_vec())) else {
        return;
    };
    for name in f.names() {
        let Some(n) = f.shape(&name).unwrap().iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        else {
            continue;
        };
        if n <= 1 << 16 {
            let _ = f.read_into(&name, &mut vec![0.0; n]);
        }
    }
});
