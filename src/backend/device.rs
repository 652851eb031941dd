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
    /// One NVIDIA GPU.
    Cuda(Gpu),
}

/// An NVIDIA GPU and the precision of its matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpu {
    /// The device's index, as `nvidia-smi` numbers it.
    pub ordinal: usize,
    /// Precision of the products of training and of f32 inference: [`Precision::Bf16`] runs
    /// them on the tensor cores from bfloat16-rounded operands, accumulating in f32;
    /// [`Precision::F32`] is plain f32 arithmetic (no TF32), for exactness checks. Norms,
    /// softmax, the loss and the optimizer are f32 either way.
    pub products: Precision,
}

impl Device {
    /// A fresh backend for this device, with nothing allocated yet. Fails with a message
    /// saying what is missing when the device cannot be used on this machine.
    pub fn open(&self) -> anyhow::Result<Box<dyn Backend>> {
        let backend: Box<dyn Backend> = match self {
            Device::Cpu => Box::new(CpuBackend::new()),
            Device::Cuda(gpu) => Box::new(super::cuda::CudaBackend::open(*gpu)?),
        };
        Ok(super::profile::wrap(backend))
    }

    /// Fails, saying what is missing, when this device cannot be used on this machine
    /// (cheap: callers check once, before any work that would be lost).
    pub fn check(&self) -> anyhow::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(gpu) => {
                let count = super::cuda::probe()?;
                anyhow::ensure!(
                    gpu.ordinal < count,
                    "there is no GPU cuda:{} on this machine: it has {count} (cuda:0 to cuda:{})",
                    gpu.ordinal,
                    count - 1
                );
                Ok(())
            }
        }
    }

    /// The precision generation and scoring use unless told otherwise: bfloat16 where the
    /// device multiplies it natively (half the bytes to read per token, at the same speed of
    /// arithmetic), f32 elsewhere.
    pub fn inference_precision(&self) -> Precision {
        match self {
            Device::Cpu if super::cpu::bf16::native() => Precision::Bf16,
            Device::Cpu => Precision::F32,
            Device::Cuda(_) => Precision::Bf16,
        }
    }

    /// This device with training's matrix products at `precision`. The CPU trains in f32
    /// only.
    pub fn with_training_precision(self, precision: Precision) -> anyhow::Result<Device> {
        match (self, precision) {
            (Device::Cpu, Precision::F32) => Ok(Device::Cpu),
            (Device::Cpu, Precision::Bf16) => {
                anyhow::bail!("training in bf16 needs a GPU (--device cuda); the CPU trains in f32")
            }
            (Device::Cuda(gpu), products) => Ok(Device::Cuda(Gpu { products, ..gpu })),
        }
    }

    /// Whether this device computes in memory of its own (a GPU's), which its engines check
    /// when they are built, rather than in the host's.
    pub fn has_own_memory(&self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// The precision training's products run at on this device.
    pub fn training_precision(&self) -> Precision {
        match self {
            Device::Cpu => Precision::F32,
            Device::Cuda(gpu) => gpu.products,
        }
    }

    /// Every device this build can open on this machine (the kernel and model tests run on
    /// each): the CPU, and the first GPU when a CUDA driver and a GPU are present. GPUs are
    /// listed with f32 products, which the exactness tests need.
    pub fn available() -> Vec<Device> {
        let mut devices = vec![Device::Cpu];
        if super::cuda::probe().is_ok() {
            devices.push(Device::Cuda(Gpu {
                ordinal: 0,
                products: Precision::F32,
            }));
        }
        devices
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(gpu) => write!(f, "cuda:{}", gpu.ordinal),
        }
    }
}

/// A device name this build does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown device '{0}': expected cpu, cuda or cuda:N (N the GPU's index)")]
pub struct UnknownDevice(String);

impl FromStr for Device {
    type Err = UnknownDevice;
    /// `cpu`, `cuda` (the first GPU) or `cuda:N`; a GPU starts with bfloat16 products.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        let gpu = |ordinal| {
            Device::Cuda(Gpu {
                ordinal,
                products: Precision::Bf16,
            })
        };
        match name.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(gpu(0)),
            _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(gpu(ordinal)),
                _ => Err(UnknownDevice(s.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Device, Gpu};
    use crate::backend::Precision;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for d in Device::available() {
            let back = d.to_string().parse::<Device>().unwrap();
            assert_eq!(back.to_string(), d.to_string());
        }
        assert_eq!(" CPU ".parse::<Device>().unwrap(), Device::Cpu);
        let gpu = |ordinal| {
            Device::Cuda(Gpu {
                ordinal,
                products: Precision::Bf16,
            })
        };
        assert_eq!("cuda".parse::<Device>().unwrap(), gpu(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), gpu(3));
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1"] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains("cuda:N"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_cpu_trains_in_f32_only() {
        assert_eq!(
            Device::Cpu.with_training_precision(Precision::F32).unwrap(),
            Device::Cpu
        );
        let err = Device::Cpu
            .with_training_precision(Precision::Bf16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--device cuda"), "{err}");
        let gpu = "cuda:1".parse::<Device>().unwrap();
        let exact = gpu.with_training_precision(Precision::F32).unwrap();
        assert_eq!(exact.training_precision(), Precision::F32);
        assert_eq!(exact.to_string(), "cuda:1");
    }
}
