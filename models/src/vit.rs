//! Building blocks shared by the vision transformers the worker runs (DINOv2, the CLIP vision
//! tower): multi-head self-attention and the bicubic resampling of a position-embedding table.
//!
//! Each model keeps its own block structure and weight names (they differ: LayerScale, SwiGLU,
//! pre-LayerNorm); only the pieces that are the same computation live here.

use crate::layers::Linear;
use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

/// Multi-head self-attention with separate query, key, value and output projections (with
/// biases), scaled by `head_dim^-0.5`. The four projections are named by the caller so that each
/// model keeps its checkpoint's key names.
#[derive(Debug)]
pub struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: i64,
}

impl SelfAttention {
    /// `paths` are the query, key, value and output projection paths.
    pub fn new(paths: [nn::Path<'_>; 4], dim: i64, heads: i64) -> Self {
        let [query, key, value, output] = paths;
        Self {
            query: Linear::new(&query, dim, dim, true),
            key: Linear::new(&key, dim, dim, true),
            value: Linear::new(&value, dim, dim, true),
            output: Linear::new(&output, dim, dim, true),
            heads,
        }
    }

    /// `x`: `[batch, tokens, dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, tokens, dim) = x.size3()?;
        let head_dim = dim / self.heads;
        let split = |t: Tensor| {
            t.view([batch, tokens, self.heads, head_dim])
                .transpose(1, 2)
        };
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let scale = (head_dim as f64).powf(-0.5);
        let attended = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        );
        let merged = attended.transpose(1, 2).reshape([batch, tokens, dim]);
        Ok(self.output.forward(&merged))
    }
}

/// Resamples a square table of patch position embeddings `[1, side*side, dim]` to a
/// `grid_height x grid_width` grid, bicubic with `align_corners=False`, in float32 whatever the
/// table's dtype (bicubic resampling in half precision shifts the embeddings), returning
/// `[1, grid_height*grid_width, dim]` in the table's dtype. `antialias` selects libtorch's
/// antialiased bicubic, which only differs from the plain one when downsampling.
pub fn resample_position_table(
    table: &Tensor,
    grid_height: i64,
    grid_width: i64,
    antialias: bool,
) -> Result<Tensor> {
    let (_, positions, dim) = table.size3()?;
    let side = (positions as f64).sqrt() as i64;
    if side * side != positions {
        bail!("the position table has {positions} patch positions, not a square number");
    }
    let grid = table
        .reshape([1, side, side, dim])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float);
    let size = [grid_height, grid_width];
    let resampled = if antialias {
        grid.f_internal_upsample_bicubic2d_aa(size, false, None, None)?
    } else {
        grid.f_upsample_bicubic2d(size, false, None, None)?
    };
    Ok(resampled
        .to_kind(table.kind())
        .permute([0, 2, 3, 1])
        .reshape([1, grid_height * grid_width, dim]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Activation;
    use tch::Device;

    #[test]
    fn activations_match_their_definitions() {
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.5, 2.0]);
        let quick = Activation::from_hf_name("quick_gelu").unwrap().forward(&x);
        let expected = &x * (&x * 1.702).sigmoid();
        assert!(quick.allclose(&expected, 1e-6, 1e-6, false));
        let exact = Activation::Gelu.forward(&x);
        let erf = &x * 0.5 * ((&x / 2f64.sqrt()).erf() + 1.0);
        assert!(exact.allclose(&erf, 1e-6, 1e-6, false));
        assert!(Activation::from_hf_name("relu6").is_err());
    }

    #[test]
    fn resampling_to_the_same_grid_keeps_the_table() {
        let table = Tensor::randn([1, 16, 3], (Kind::Float, Device::Cpu));
        for antialias in [false, true] {
            let same = resample_position_table(&table, 4, 4, antialias).unwrap();
            assert!(same.allclose(&table, 1e-5, 1e-5, false));
        }
        let other = resample_position_table(&table, 2, 6, true).unwrap();
        assert_eq!(other.size(), vec![1, 12, 3]);
        let not_square = Tensor::zeros([1, 15, 3], (Kind::Float, Device::Cpu));
        assert!(resample_position_table(&not_square, 2, 2, false).is_err());
    }
}
