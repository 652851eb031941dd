//! Where the model computes: chosen once (by the caller), opened into a [`Backend`].

use super::cpu::CpuBackend;
use super::{Backend, Precision};
use std::fmt;
use std::str::FromStr;

/// A compute device. Every engine, decoder and trainer is opened on one; nothing else in the
/// library names a concrete backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Device {
    /// Host memory and every core of the current `rayon` pool.
    #[default]
    Cpu,
}

impl Device {
    /// A fresh backend for this device, with nothing allocated yet.
    pub fn open(&self) -> anyhow::Result<Box<dyn Backend>> {
        match self {
            Device::Cpu => Ok(Box::new(CpuBackend::new())),
        }
    }

    /// The precision generation and scoring use unless told otherwise: bfloat16 where the
    /// device multiplies it natively (half the bytes to read per token, at the same speed of
    /// arithmetic), f32 elsewhere.
    pub fn inference_precision(&self) -> Precision {
        match self {
            Device::Cpu if super::cpu::bf16::native() => Precision::Bf16,
            Device::Cpu => Precision::F32,
        }
    }

    /// Every device this build can open on this machine (the kernel and model tests run on
    /// each).
    pub fn available() -> Vec<Device> {
        vec![Device::Cpu]
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
        }
    }
}

/// A device name this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown device '{0}': this build computes on: cpu")]
pub struct UnknownDevice(String);

impl FromStr for Device {
    type Err = UnknownDevice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            _ => Err(UnknownDevice(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for d in Device::available() {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
        assert_eq!(" CPU ".parse::<Device>().unwrap(), Device::Cpu);
        let err = "tpu".parse::<Device>().unwrap_err().to_string();
        assert!(err.contains("'tpu'") && err.contains("cpu"), "{err}");
    }
}
