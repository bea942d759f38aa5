//! Choosing the libtorch device and dtype from configuration strings, and running models on it
//! so that a device failure costs one attempt and nothing more.

use crate::runner::JobError;
use anyhow::{anyhow, bail, Result};
use parking_lot::Mutex;
use std::sync::Arc;
use tch::{Device, Kind};

/// Models that run one job at a time on a blocking thread.
///
/// libtorch tensors may move between threads but not be shared, so the models sit behind a
/// lock; the worker runs one job at a time anyway. The lock cannot be poisoned: when libtorch
/// fails inside a job (tch's panicking calls panic on out of memory or a CUDA error), the
/// failure unwinds, dropping the attempt's tensors so their memory returns to libtorch's
/// allocator, and the weights, which jobs only read, stay good for the next job.
pub struct ModelLock<M> {
    models: Arc<Mutex<M>>,
}

impl<M: Send + 'static> ModelLock<M> {
    pub fn new(models: M) -> Self {
        Self {
            models: Arc::new(Mutex::new(models)),
        }
    }

    /// Runs `work` with the models on a blocking thread, in the caller's tracing span. A panic
    /// is a device failure: transient, and counted by the job loop.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut M) -> Result<T, JobError> + Send + 'static,
    ) -> Result<T, JobError> {
        let models = self.models.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _job = span.enter();
            work(&mut models.lock())
        })
        .await
        .map_err(|panic| JobError::device(anyhow!("the models failed on the device: {panic}")))?
    }
}

/// The failure of a model call: libtorch's own errors (out of memory, a CUDA error, a kernel
/// that refuses its inputs) are the device's, worth another attempt; anything else is the job's
/// (an input that does not fit the models), permanent.
pub fn model_failure(error: anyhow::Error) -> JobError {
    let from_libtorch = error
        .chain()
        .any(|cause| cause.downcast_ref::<tch::TchError>().is_some());
    if from_libtorch {
        JobError::device(error)
    } else {
        JobError::permanent(error)
    }
}

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

    /// A real libtorch failure on the CPU: asking for a tensor far beyond any machine's memory.
    fn impossible_allocation() -> tch::Tensor {
        tch::Tensor::zeros([1 << 36, 1 << 10], (Kind::Float, Device::Cpu))
    }

    #[tokio::test]
    async fn a_libtorch_failure_fails_the_attempt_and_leaves_the_models_usable() {
        let lock = ModelLock::new(tch::Tensor::ones([4], (Kind::Float, Device::Cpu)));
        // tch's panicking call: out of memory inside libtorch.
        let error = lock
            .run(|_| Ok(impossible_allocation().numel()))
            .await
            .unwrap_err();
        assert!(error.device_fault, "{error}");
        assert_eq!(error.failure, syncd_proto::messages::FailureKind::Transient);
        // The same failure returned as an error rather than a panic.
        let error = lock
            .run(|_| {
                tch::Tensor::f_zeros([1 << 36, 1 << 10], (Kind::Float, Device::Cpu))
                    .map_err(|error| model_failure(error.into()))
            })
            .await
            .unwrap_err();
        assert!(error.device_fault, "{error}");
        assert!(format!("{error}").contains("memory"), "{error}");
        // The lock is not poisoned and the weights are intact.
        let sum = lock
            .run(|weights| Ok(weights.sum(Kind::Float).double_value(&[])))
            .await
            .unwrap();
        assert_eq!(sum, 4.0);
        // An error that is not libtorch's is the job's own.
        let error = model_failure(anyhow!("a group needs at least 2 prompts"));
        assert!(!error.device_fault);
        assert_eq!(error.failure, syncd_proto::messages::FailureKind::Permanent);
    }
}
