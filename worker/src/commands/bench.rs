//! What the benchmark commands share: a random-weight FLUX transformer built on the device,
//! device synchronisation around timed regions, and the peak GPU memory of this process.

use anyhow::Result;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use syncd_models::flux::{Config, FluxTransformer};
use tch::{Device, Kind};

/// A transformer of `config` (a diffusers `config.json`; `default` when `None`) created on the
/// device with random weights: starts in seconds, needs no checkpoint.
pub fn random_transformer(
    config: Option<&Path>,
    default: Config,
    device: Device,
    kind: Kind,
) -> Result<FluxTransformer> {
    let config = match config {
        Some(path) => Config::from_file(path)?,
        None => default,
    };
    let mut model = FluxTransformer::zeros(config, device, kind)?;
    model.randomize(0.02);
    synchronize(device);
    Ok(model)
}

/// Samples this process's GPU memory with `nvidia-smi` until dropped; keeps the peak (MiB).
pub struct MemoryProbe {
    stop: Arc<AtomicBool>,
    peak_mib: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl MemoryProbe {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_mib = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, peak_mib) = (stop.clone(), peak_mib.clone());
            std::thread::spawn(move || {
                let pid = std::process::id().to_string();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(output) = std::process::Command::new("nvidia-smi")
                        .args([
                            "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits",
                        ])
                        .output()
                    {
                        for line in String::from_utf8_lossy(&output.stdout).lines() {
                            let mut fields = line.split(',').map(str::trim);
                            if fields.next() == Some(pid.as_str()) {
                                if let Some(Ok(mib)) = fields.next().map(str::parse::<u64>) {
                                    peak_mib.fetch_max(mib, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            stop,
            peak_mib,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        Some(self.peak_mib.load(Ordering::Relaxed)).filter(|&mib| mib > 0)
    }
}

/// Waits for the device's queued work (a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
