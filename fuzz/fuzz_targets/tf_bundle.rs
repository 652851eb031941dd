//! A TensorFlow checkpoint index (sorted string table + protobuf entries); the same bytes
//! serve as the one data shard so that entries' offsets and checksums are exercised too.
#![no_main]
use igpt::formats::{Bytes, TensorSource, tf};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok((_, entries)) = tf::parse_index(data) else {
        return;
    };
    let bundle = tf::Bundle::from_parts(Path::new("fuzz"), entries, vec![Bytes::Owned(data.to_vec())]);
    for name in bundle.names() {
        let Some(n) = bundle.shape(&name).unwrap().iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        else {
            continue;
        };
        if n <= 1 << 16 {
            let _ = bundle.read_into(&name, &mut vec![0.0; n]);
        }
    }
});
