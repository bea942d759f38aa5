//! Choosing the libtorch device and dtype from configuration strings, and running models on it
//! so that a device failure costs one attempt and nothing more.

use crate::runner::JobError;
use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind};

/// Models that live on a thread of their own, which runs every piece of work on them, one at
/// a time.
///
/// One long-lived thread, not a blocking thread from a pool, because libtorch keeps state per
/// thread that a worker reuses from one job to the next: cuDNN's attention graphs, one per
/// shape and built on its first call, are cached per thread (`thread_local` in libtorch's
/// `MHA.cpp`). Work hopping between pool threads would build them again on each new thread.
///
/// A panic inside the work (tch's panicking calls panic on out of memory or a CUDA error) is
/// caught on the thread: it unwinds, dropping the attempt's tensors so their memory returns to
/// libtorch's allocator, and the weights, which jobs only read, stay good for the next job on
/// the same thread.
pub struct ModelThread<M> {
    work: std::sync::mpsc::Sender<Work<M>>,
}

/// One piece of work on the models, with the way back to its caller inside.
type Work<M> = Box<dyn FnOnce(&mut M) + Send>;

impl<M: Send + 'static> ModelThread<M> {
    /// Moves `models` onto a new thread named `models-{name}`.
    pub fn spawn(name: &str, mut models: M) -> Result<Self> {
        let (work, queue) = std::sync::mpsc::channel::<Work<M>>();
        std::thread::Builder::new()
            .name(format!("models-{name}"))
            .spawn(move || {
                // Ends when the owner is dropped; the models are dropped here, on their thread.
                for job in queue {
                    job(&mut models);
                }
            })
            .with_context(|| format!("starting the thread of the {name} models"))?;
        Ok(Self { work })
    }

    /// Runs `work` with the models on their thread, in the caller's tracing span. A panic is a
    /// device failure: transient, and counted by the job loop.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut M) -> Result<T, JobError> + Send + 'static,
    ) -> Result<T, JobError> {
        let (result, outcome) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job = Box::new(move |models: &mut M| {
            let _job = span.enter();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(models)))
                .unwrap_or_else(|panic| {
                    Err(JobError::device(anyhow!(
                        "the models failed on the device: {}",
                        panic_message(panic.as_ref())
                    )))
                });
            // The caller may have stopped waiting (its job was cancelled): nothing to tell.
            let _ = result.send(outcome);
        });
        self.work
            .send(job)
            .map_err(|_| JobError::device(anyhow!("the models' thread has stopped")))?;
        outcome
            .await
            .map_err(|_| JobError::device(anyhow!("the models' thread stopped during the work")))?
    }
}

/// The text a panic carries (`panic!` with a literal or a formatted message), if any.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
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
        let lock =
            ModelThread::spawn("test", tch::Tensor::ones([4], (Kind::Float, Device::Cpu))).unwrap();
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
        // The thread lives on and the weights are intact.
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

    #[tokio::test]
    async fn every_piece_of_work_runs_on_the_models_own_thread_even_after_a_panic() {
        let models = ModelThread::spawn("test", ()).unwrap();
        let on_thread = || models.run(|_| Ok(std::thread::current()));
        let first = on_thread().await.unwrap();
        assert_eq!(first.name(), Some("models-test"));
        assert_ne!(first.id(), std::thread::current().id());
        let error = models
            .run(|_| -> Result<(), JobError> { panic!("a CUDA error") })
            .await
            .unwrap_err();
        assert!(error.device_fault, "{error}");
        assert!(format!("{error}").contains("a CUDA error"), "{error}");
        // Work given while the thread is busy waits its turn on the same thread.
        let (second, third) = tokio::join!(on_thread(), on_thread());
        assert_eq!(second.unwrap().id(), first.id());
        assert_eq!(third.unwrap().id(), first.id());
    }
}
