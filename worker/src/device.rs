//! The compute device of `--device`: `cpu`, `cuda` or `cuda:N`.
//!
//! A CUDA device is opened only after the driver has been probed ([`probe_cuda`]): cudarc
//! panics, rather than returning an error, in some states of a missing or broken driver,
//! so every call into it here runs under `catch_unwind` and a driver that does not answer
//! becomes an error that says so. Without the `cuda` feature, asking for a GPU is an error
//! that names the build to use.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// What `--device` names, before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (the fused ops).
    Cpu,
    /// CUDA device N (the composite ops, f32).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Ok(DeviceSpec::Cuda(n.parse().with_context(|| {
                    format!("--device {s}: cuda:N needs a device number")
                })?)),
                None => bail!("unknown --device `{s}` (expected cpu, cuda or cuda:N)"),
            },
        }
    }

    /// The name the coordinator is told (`Capabilities.device`): `cpu` or `cuda:N`.
    pub fn name(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Refuses a GPU in a build without the `cuda` feature; opens nothing.
    pub fn check_build(self) -> Result<Self> {
        if let DeviceSpec::Cuda(n) = self {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device cuda:{n}: this gpo was built without the `cuda` feature (scripts/cuda_build.sh --release builds it)"
                );
            }
        }
        Ok(self)
    }

    /// [`DeviceSpec::check_build`], then, for a GPU, the driver is probed and the ordinal
    /// checked, without opening the device: what a process checks before it starts work
    /// that would open it later (a worker before it registers).
    pub fn probe(self) -> Result<Self> {
        if let DeviceSpec::Cuda(n) = self.check_build()? {
            let count = probe_cuda()?;
            if n >= count {
                bail!("--device cuda:{n}: the driver sees {count} CUDA device(s)");
            }
        }
        Ok(self)
    }

    /// Opens the device: the driver is probed first, so a machine without one gets an
    /// error rather than a panic.
    pub fn open(self) -> Result<Device> {
        match self.check_build()? {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                self.probe()?;
                guarded("opening the CUDA device", || {
                    Device::new_cuda(n).with_context(|| format!("opening CUDA device {n}"))
                })
            }
        }
    }
}

/// Parses and opens `--device` in one go.
pub fn open(s: &str) -> Result<Device> {
    DeviceSpec::parse(s)?.open()
}

/// The device a worker whose capabilities name `reported` computes on: `cuda`/`cuda:N` is
/// opened (probing the driver), anything else (`cpu`, or a name like the benchmark's
/// `simulated`) is the CPU.
pub fn for_capability(reported: &str) -> Result<Device> {
    if reported.starts_with("cuda") {
        open(reported)
    } else {
        Ok(Device::Cpu)
    }
}

/// Runs `f`, turning a panic inside cudarc into an error that names `what`.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            bail!("{what}: the CUDA driver could not be used ({msg})")
        }
    }
}

/// The number of CUDA devices the driver sees: `cuInit` and `cuDeviceGetCount`, each
/// checked. An error (not a panic) when there is no driver, no device, or a stub driver.
#[cfg(feature = "cuda")]
pub fn probe_cuda() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::result;
    guarded("probing the CUDA driver", || {
        result::init().map_err(|e| {
            anyhow::anyhow!(
                "no usable CUDA driver: cuInit failed ({e:?}); a CUDA 13 build needs an NVIDIA GPU with an R580 or newer driver"
            )
        })?;
        let n = result::device::get_count()
            .map_err(|e| anyhow::anyhow!("cuDeviceGetCount failed ({e:?})"))?;
        if n <= 0 {
            bail!("the CUDA driver sees no device");
        }
        Ok(n as usize)
    })
}

/// Without the `cuda` feature there is no driver to probe.
#[cfg(not(feature = "cuda"))]
pub fn probe_cuda() -> Result<usize> {
    bail!(
        "this gpo was built without the `cuda` feature (scripts/cuda_build.sh --release builds it)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_a_gpu_needs_the_cuda_build() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::parse("cuda").unwrap().name(), "cuda:0");
        assert_eq!(DeviceSpec::Cpu.name(), "cpu");
        let e = DeviceSpec::parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("device number"), "{e}");
        let e = DeviceSpec::parse("metal").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        assert!(open("cpu").unwrap().is_cpu());
        assert!(for_capability("simulated").unwrap().is_cpu());
        assert_eq!(DeviceSpec::Cpu.probe().unwrap(), DeviceSpec::Cpu);
        if !cfg!(feature = "cuda") {
            let e = open("cuda").unwrap_err().to_string();
            assert!(e.contains("without the `cuda` feature"), "{e}");
            assert!(probe_cuda().is_err());
            assert!(DeviceSpec::Cuda(0).probe().is_err());
        }
    }

    #[test]
    fn a_panic_inside_the_driver_becomes_an_error() {
        let e = guarded::<()>("probing", || panic!("libcuda.so.1 not found"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("probing") && e.contains("libcuda.so.1 not found"),
            "{e}"
        );
    }
}
