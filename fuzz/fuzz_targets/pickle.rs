//! The safe unpickler on arbitrary bytes: errors are fine, panics and hangs are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = igpt::formats::pickle::read_state_dict(data);
});
