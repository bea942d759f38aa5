//! Choosing the libtorch device and dtype from configuration strings.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// Parses `cpu`, `cuda` or `cuda:N`. Asking for CUDA where libtorch sees none is an error, not a
/// silent fall-back to the CPU: a GPU worker running on the CPU would be a thousand times slower.
pub fn parse_device(text: &str) -> Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("unknown device {other:?} (expected cpu, cuda or cuda:N)"),
        },
    };
    if let Device::Cuda(index) = device {
        let available = tch::Cuda::device_count() as usize;
        if index >= available {
            bail!("device {text} requested but libtorch sees {available} CUDA device(s)");
        }
    }
    Ok(device)
}

/// Parses `fp32`/`float32` or `bf16`/`bfloat16`.
pub fn parse_dtype(text: &str) -> Result<Kind> {
    match text {
        "fp32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => bail!("unknown dtype {other:?} (expected fp32 or bf16)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:999").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_dtype("fp8").is_err());
    }
}
