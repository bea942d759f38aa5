//! Timestep and position embeddings of FLUX.
//!
//! - Timesteps (and the guidance scale) use the sinusoidal embedding of DDPM with 256 channels,
//!   `flip_sin_to_cos` (cos first) and no frequency shift, of `t * 1000` (diffusers
//!   `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`).
//! - Positions use rotary embeddings over three id axes (text index, row, column). The angle
//!   tables are computed in float64 and applied in float32 whatever the model dtype, as diffusers
//!   does (`FluxPosEmbed`, `apply_rotary_emb` with interleaved pairs).

use super::config::{ROPE_THETA, TIMESTEP_EMBEDDING_DIM};
use tch::{Device, Kind, Tensor};

/// Sinusoidal embedding [B, 256] (float32) of already-scaled timesteps `t` [B].
pub fn timestep_embedding(timesteps: &Tensor) -> Tensor {
    let half = TIMESTEP_EMBEDDING_DIM / 2;
    let exponent =
        Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10_000f64.ln())) / half as f64;
    let angles = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    Tensor::cat(&[angles.cos(), angles.sin()], -1)
}

/// Cosine and sine tables [S, head_dim] (float32) for position ids [S, 3].
///
/// Each axis `a` with `d_a` dimensions rotates `d_a / 2` pairs at frequencies
/// `theta^(-2i/d_a)`; each angle is repeated for both members of its pair.
pub fn rope_tables(ids: &Tensor, axes_dims: &[i64]) -> (Tensor, Tensor) {
    let device = ids.device();
    let positions = ids.to_kind(Kind::Float).to_kind(Kind::Double);
    let mut cos_parts = Vec::with_capacity(axes_dims.len());
    let mut sin_parts = Vec::with_capacity(axes_dims.len());
    for (axis, &dim) in axes_dims.iter().enumerate() {
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Double, device)) / dim as f64;
        let frequencies = Tensor::full([1], ROPE_THETA, (Kind::Double, device))
            .pow(&exponents)
            .reciprocal();
        let angles = positions
            .select(1, axis as i64)
            .unsqueeze(1)
            .matmul(&frequencies.unsqueeze(0));
        cos_parts.push(
            angles
                .cos()
                .repeat_interleave_self_int(2, 1, None)
                .to_kind(Kind::Float),
        );
        sin_parts.push(
            angles
                .sin()
                .repeat_interleave_self_int(2, 1, None)
                .to_kind(Kind::Float),
        );
    }
    (Tensor::cat(&cos_parts, -1), Tensor::cat(&sin_parts, -1))
}

/// Rotates query or key heads `xs` [B, S, H, D] by the tables [S, D]; computed in float32 and
/// returned in the dtype of `xs`.
pub fn apply_rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let size = xs.size();
    let pairs = xs.reshape([size[0], size[1], size[2], size[3] / 2, 2]);
    let real = pairs.select(-1, 0);
    let imaginary = pairs.select(-1, 1);
    let rotated = Tensor::stack(&[-imaginary, real], -1).reshape(size.as_slice());
    let cos = cos.unsqueeze(0).unsqueeze(2);
    let sin = sin.unsqueeze(0).unsqueeze(2);
    (xs.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(xs.kind())
}

/// diffusers' `_prepare_latent_image_ids`: ids [h*w, 3] = (0, row, column), row-major.
pub fn image_ids(height: i64, width: i64, device: Device) -> Tensor {
    let rows = Tensor::arange(height, (Kind::Float, device))
        .unsqueeze(1)
        .expand([height, width], false);
    let columns = Tensor::arange(width, (Kind::Float, device))
        .unsqueeze(0)
        .expand([height, width], false);
    Tensor::stack(&[rows.zeros_like(), rows, columns], -1).reshape([height * width, 3])
}

/// Text ids: all zero, [len, 3].
pub fn text_ids(len: i64, device: Device) -> Tensor {
    Tensor::zeros([len, 3], (Kind::Float, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_of_position_zero_is_identity() {
        let ids = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
        let (cos, sin) = rope_tables(&ids, &[4, 4, 8]);
        let xs = Tensor::randn([1, 3, 2, 16], (Kind::Float, Device::Cpu));
        assert!(apply_rope(&xs, &cos, &sin).allclose(&xs, 1e-6, 1e-6, false));
    }

    #[test]
    fn image_ids_are_row_major() {
        let ids = image_ids(2, 3, Device::Cpu);
        let expected = Tensor::from_slice(&[
            0f32, 0., 0., 0., 0., 1., 0., 0., 2., 0., 1., 0., 0., 1., 1., 0., 1., 2.,
        ])
        .reshape([6, 3]);
        assert!(ids.equal(&expected));
    }

    #[test]
    fn timestep_embedding_starts_with_cosines() {
        let embedding = timestep_embedding(&Tensor::from_slice(&[0f32]));
        assert_eq!(embedding.size(), [1, 256]);
        assert_eq!(embedding.double_value(&[0, 0]), 1.0);
        assert_eq!(embedding.double_value(&[0, 128]), 0.0);
    }
}
