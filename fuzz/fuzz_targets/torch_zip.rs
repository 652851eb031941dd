//! A whole PyTorch zip checkpoint: zip directory, pickle, storages, strided reads.
#![no_main]
use igpt::formats::{Bytes, TensorSource, pickle::TorchZip};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(z) = TorchZip::from_bytes(Path::new("fuzz.bin"), Bytes::Owned(data.to_vec())) else {
        return;
    };
    for name in z.names() {
        let Some(n) = z.shape(&name).unwrap().iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        else {
            continue;
        };
        if n <= 1 << 16 {
            let _ = z.read_into(&name, &mut vec![0.0; n]);
        }
    }
});
