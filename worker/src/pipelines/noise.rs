//! Seeded Gaussian noise, generated on the CPU with ChaCha8 so that a group regenerates bit for
//! bit from its seed on any machine, whatever the device or libtorch version (libtorch's own
//! generators differ between CPU and CUDA).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
    pub fn sample(&mut self, shape: &[i64], device: Device, kind: Kind) -> Tensor {
        let count: i64 = shape.iter().product();
        let mut values = Vec::with_capacity(count as usize);
        while (values.len() as i64) < count {
            // u1 in (0, 1] so that ln(u1) is finite.
            let u1: f64 = 1.0 - self.rng.random::<f64>();
            let u2: f64 = self.rng.random::<f64>();
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            values.push((radius * angle.cos()) as f32);
            if (values.len() as i64) < count {
                values.push((radius * angle.sin()) as f32);
            }
        }
        Tensor::from_slice(&values)
            .reshape(shape)
            .to_device(device)
            .to_kind(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let a = NoiseSource::new(7).sample(&[4, 1000], Device::Cpu, Kind::Float);
        let b = NoiseSource::new(7).sample(&[4, 1000], Device::Cpu, Kind::Float);
        let c = NoiseSource::new(8).sample(&[4, 1000], Device::Cpu, Kind::Float);
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
        assert!(a.mean(Kind::Float).double_value(&[]).abs() < 0.05);
        assert!((a.std(true).double_value(&[]) - 1.0).abs() < 0.05);
    }
}
