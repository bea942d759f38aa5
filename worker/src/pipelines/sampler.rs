//! Flow-matching Euler sampling as FLUX uses it (diffusers `FlowMatchEulerDiscreteScheduler`
//! with FLUX's resolution-dependent shift), and the 2x2 latent packing of FLUX.
//!
//! The schedule is computed in float32 the way diffusers computes it (NumPy float32 arrays with
//! Python scalars), so timesteps match to the last bit; the Euler step runs in float32 and casts
//! back to the latents' dtype, as diffusers' step does.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Kind, Tensor};

/// The scheduler settings FLUX pipelines read from `scheduler/scheduler_config.json`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct SchedulerConfig {
    #[serde(default = "default_base_seq_len")]
    pub base_image_seq_len: i64,
    #[serde(default = "default_max_seq_len")]
    pub max_image_seq_len: i64,
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    /// FLUX.1-dev shifts by sequence length; a fixed `shift` applies otherwise.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: i64,
    /// Options of the diffusers scheduler this sampler does not implement; a config that turns
    /// one on is rejected rather than silently sampled differently.
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    /// `"exponential"` (FLUX's) or `"linear"`; only the exponential shift is implemented.
    #[serde(default)]
    pub time_shift_type: Option<String>,
}

fn default_base_seq_len() -> i64 {
    256
}
fn default_max_seq_len() -> i64 {
    4096
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_shift() -> f64 {
    1.0
}
fn default_train_timesteps() -> i64 {
    1000
}

impl Default for SchedulerConfig {
    /// FLUX.1-dev's scheduler config.
    fn default() -> Self {
        Self {
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            base_shift: 0.5,
            max_shift: 1.15,
            use_dynamic_shifting: true,
            shift: 3.0,
            num_train_timesteps: 1000,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
            invert_sigmas: false,
            time_shift_type: None,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scheduler config {}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a scheduler config", path.display()))?;
        if config.shift_terminal.is_some()
            || config.use_karras_sigmas
            || config.use_exponential_sigmas
            || config.use_beta_sigmas
            || config.stochastic_sampling
            || config.invert_sigmas
            || config
                .time_shift_type
                .as_deref()
                .is_some_and(|shift| shift != "exponential")
        {
            bail!(
                "scheduler config {} enables options this sampler does not implement \
                 (shift_terminal, karras/exponential/beta sigmas, stochastic sampling, inverted sigmas, \
                 a linear time shift)",
                path.display()
            );
        }
        Ok(config)
    }

    /// FLUX's shift `mu`, linear in the image token count through
    /// `(base_image_seq_len, base_shift)` and `(max_image_seq_len, max_shift)`.
    pub fn mu(&self, image_seq_len: i64) -> f64 {
        let slope = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len - self.base_image_seq_len) as f64;
        let intercept = self.base_shift - slope * self.base_image_seq_len as f64;
        image_seq_len as f64 * slope + intercept
    }

    /// The sampling schedule for `steps` steps over `image_seq_len` image tokens.
    pub fn schedule(&self, steps: usize, image_seq_len: i64) -> Result<Schedule> {
        if steps == 0 {
            bail!("the number of sampling steps must be at least 1");
        }
        // np.linspace(1, 1/steps, steps) in float64, then float32.
        let first = 1.0f64;
        let last = 1.0 / steps as f64;
        let linear: Vec<f32> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    first as f32
                } else {
                    let step = (last - first) / (steps - 1) as f64;
                    (if i == steps - 1 {
                        last
                    } else {
                        first + i as f64 * step
                    }) as f32
                }
            })
            .collect();
        let mut sigmas: Vec<f32> = if self.use_dynamic_shifting {
            let exp_mu = self.mu(image_seq_len).exp() as f32;
            linear
                .iter()
                .map(|&t| {
                    let odds = 1.0f32 / t - 1.0f32;
                    exp_mu / (exp_mu + odds)
                })
                .collect()
        } else {
            let shift = self.shift as f32;
            linear
                .iter()
                .map(|&t| shift * t / (1.0f32 + (shift - 1.0f32) * t))
                .collect()
        };
        let train = self.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&sigma| sigma * train).collect();
        sigmas.push(0.0);
        Ok(Schedule { sigmas, timesteps })
    }
}

/// Noise levels of one sampling run.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// `steps + 1` noise levels from ~1 down to the terminal 0.
    pub sigmas: Vec<f32>,
    /// `steps` scheduler timesteps (`sigma * 1000`).
    pub timesteps: Vec<f32>,
}

impl Schedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The transformer's timestep at step `index`, in [0, 1]: diffusers passes
    /// `timestep / 1000` (float32), which need not equal the sigma bit for bit.
    pub fn model_time(&self, index: usize) -> f32 {
        self.timesteps[index] / 1000.0f32
    }
}

/// One Euler step `x + (sigma_next - sigma) * v`, in float32, returned in `velocity`'s dtype.
pub fn euler_step(latents: &Tensor, velocity: &Tensor, sigma: f32, sigma_next: f32) -> Tensor {
    let dt = sigma_next - sigma;
    (latents.to_kind(Kind::Float) + velocity * f64::from(dt)).to_kind(velocity.kind())
}

/// `[B, C, H, W] -> [B, (H/2)(W/2), 4C]`, channels in the order (c, ph, pw).
pub fn pack_latents(latents: &Tensor) -> Tensor {
    let [batch, channels, height, width]: [i64; 4] =
        latents.size().try_into().expect("latents are [B, C, H, W]");
    latents
        .reshape([batch, channels, height / 2, 2, width / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([batch, (height / 2) * (width / 2), channels * 4])
}

/// The inverse of [`pack_latents`] for a latent grid of `height` x `width` (latent pixels).
pub fn unpack_latents(packed: &Tensor, height: i64, width: i64) -> Tensor {
    let [batch, _, channels]: [i64; 3] = packed
        .size()
        .try_into()
        .expect("packed latents are [B, N, C]");
    packed
        .reshape([batch, height / 2, width / 2, channels / 4, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([batch, channels / 4, height, width])
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncd_models::weights::read_all;

    #[test]
    fn schedules_match_diffusers() {
        let fixture = read_all(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flux/schedule.safetensors"
        )))
        .unwrap();
        let config = SchedulerConfig::default();
        for (steps, tokens) in [(4usize, 16i64), (30, 1024), (50, 4096)] {
            let schedule = config.schedule(steps, tokens).unwrap();
            let sigmas =
                Vec::<f32>::try_from(&fixture[&format!("sigmas_{steps}_{tokens}")]).unwrap();
            let timesteps =
                Vec::<f32>::try_from(&fixture[&format!("timesteps_{steps}_{tokens}")]).unwrap();
            assert_eq!(
                schedule.sigmas, sigmas,
                "sigmas for {steps} steps, {tokens} tokens"
            );
            assert_eq!(schedule.timesteps, timesteps);
        }
        assert!((config.mu(1024) - 0.6300).abs() < 1e-3);
        assert!((config.mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn packing_round_trips_in_diffusers_order() {
        let latents =
            Tensor::arange(2 * 3 * 4 * 6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3, 4, 6]);
        let packed = pack_latents(&latents);
        assert_eq!(packed.size(), [2, 6, 12]);
        // Token 0 holds channel 0's 2x2 patch first: (0,0), (0,1), (1,0), (1,1).
        let first: Vec<f32> = Vec::try_from(packed.get(0).get(0).narrow(0, 0, 4)).unwrap();
        assert_eq!(first, [0.0, 1.0, 6.0, 7.0]);
        assert!(unpack_latents(&packed, 4, 6).equal(&latents));
    }
}
