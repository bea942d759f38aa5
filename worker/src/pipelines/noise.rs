//! Seeded Gaussian noise, generated on the CPU with ChaCha8 so that a group regenerates bit for
//! bit from its seed on any machine, whatever the device or libtorch version (libtorch's own
//! generators differ between CPU and CUDA).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::TchError;
use tch::{Device, Kind, Tensor};

/// A stream of standard normal samples from one seed.
pub struct NoiseSource {
    rng: ChaCha8Rng,
}

impl NoiseSource {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `shape` samples (Box-Muller, float32), on `device` in `kind`.
    ///
    /// The tensor is allocated by libtorch first and filled a chunk at a time, so a size the
    /// machine cannot hold fails as libtorch's out-of-memory error, an attempt's transient
    /// failure, instead of aborting the process in Rust's allocator.
    pub fn sample(
        &mut self,
        shape: &[i64],
        device: Device,
        kind: Kind,
    ) -> Result<Tensor, TchError> {
        const CHUNK: i64 = 1 << 20;
        let count: i64 = shape.iter().product();
        let samples = Tensor::f_empty([count], (Kind::Float, Device::Cpu))?;
        let mut chunk = Vec::with_capacity(CHUNK.min(count) as usize);
        let mut filled = 0;
        while filled < count {
            let length = CHUNK.min(count - filled);
            chunk.clear();
            while (chunk.len() as i64) < length {
                // u1 in (0, 1] so that ln(u1) is finite.
                let u1: f64 = 1.0 - self.rng.random::<f64>();
                let u2: f64 = self.rng.random::<f64>();
                let radius = (-2.0 * u1.ln()).sqrt();
                let angle = std::f64::consts::TAU * u2;
                chunk.push((radius * angle.cos()) as f32);
                if (chunk.len() as i64) < length {
                    chunk.push((radius * angle.sin()) as f32);
                }
            }
            samples
                .narrow(0, filled, length)
                .copy_(&Tensor::from_slice(&chunk));
            filled += length;
        }
        samples
            .f_reshape(shape)?
            .f_to_device(device)?
            .f_to_kind(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let sample = |seed| {
            NoiseSource::new(seed)
                .sample(&[4, 1000], Device::Cpu, Kind::Float)
                .unwrap()
        };
        let (a, b, c) = (sample(7), sample(7), sample(8));
        assert!(a.equal(&b));
        // Filled a chunk at a time, the stream is the one drawn all at once: a longer sample
        // starts with a shorter one from the same seed.
        let long = NoiseSource::new(7)
            .sample(&[(1 << 20) + 3], Device::Cpu, Kind::Float)
            .unwrap();
        assert!(long.narrow(0, 0, 4000).equal(&a.reshape([4000])));
        let short = NoiseSource::new(7)
            .sample(&[3], Device::Cpu, Kind::Float)
            .unwrap();
        assert!(long.narrow(0, 0, 3).equal(&short));
        assert!(!a.equal(&c));
        assert!(a.mean(Kind::Float).double_value(&[]).abs() < 0.05);
        assert!((a.std(true).double_value(&[]) - 1.0).abs() < 0.05);
    }
}
