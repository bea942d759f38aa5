//! Masked Shared Attention (MSA): the images of a group attend to each other's image tokens
//! inside every attention layer, so that FLUX draws the same object in all of them (SynCD).
//!
//! For image `n` of a group of `N`, the key/value sequence of the reference implementation is
//! `[own text, own image, block 1, ..., block N-1]`, block `i` being the image tokens of image
//! `(n - i) mod N`, rotated at the positions of a grid `N * h` rows tall (block `i` at rows
//! `i*h .. (i+1)*h`). With foreground masks (every step but the first), the reference adds a
//! dense mask that lets image queries see only the foreground tokens of the other blocks and
//! lets text queries see only their own text and image.
//!
//! This module computes exactly that without the dense mask: per image, the image queries
//! attend (unmasked) to the own tokens plus the *gathered* foreground tokens of the other
//! images, rotated at their block positions; the text queries of all images attend to their own
//! sequence in one batched call. Blocked keys get zero weight in the reference
//! (`exp(-65504 - max)` underflows), so dropping them is the same computation, and the fused
//! attention kernels stay usable.
//!
//! The same pass can capture, for the deformable-object masks, each image's text-to-image
//! attention to its category word ([`AttentionCapture`]).

use super::attention::{sdpa, JointQkv, Rope};
use super::embeddings::{apply_rope, rope_tables};
use anyhow::{bail, Result};
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// Accumulates, over the layers of one forward pass, each image's attention from its image
/// tokens to the tokens of its category word.
///
/// Per layer: logits `scale * q_text . k_image` (after RoPE) are soft-maxed over the text tokens
/// for every image token, averaged over heads and summed over the word's token span, giving an
/// `[N, h*w]` map that is summed over layers here.
pub struct AttentionCapture {
    /// Per image, the half-open token range `[start, end)` of the category word.
    spans: Vec<(i64, i64)>,
    state: RefCell<CaptureState>,
}

#[derive(Default)]
struct CaptureState {
    sum: Option<Tensor>,
    layers: usize,
}

impl AttentionCapture {
    pub fn new(spans: Vec<(i64, i64)>) -> Self {
        Self {
            spans,
            state: RefCell::new(CaptureState::default()),
        }
    }

    pub fn spans(&self) -> &[(i64, i64)] {
        &self.spans
    }

    /// The sum over the layers seen since the last call, [N, h*w] float32, and the layer count.
    pub fn take(&self) -> Option<(Tensor, usize)> {
        let mut state = self.state.borrow_mut();
        let layers = std::mem::take(&mut state.layers);
        state.sum.take().map(|sum| (sum, layers))
    }

    fn record(&self, query: &Tensor, key: &Tensor, text_len: i64) {
        let image_len = key.size()[1] - text_len;
        let head_dim = *query.size().last().expect("query has a head dimension");
        let scale = 1.0 / (head_dim as f64).sqrt();
        let maps: Vec<Tensor> = self
            .spans
            .iter()
            .enumerate()
            .map(|(image, &(start, end))| {
                let text_queries = query
                    .get(image as i64)
                    .narrow(0, 0, text_len)
                    .transpose(0, 1);
                let image_keys = key
                    .get(image as i64)
                    .narrow(0, text_len, image_len)
                    .transpose(0, 1);
                // [heads, image tokens, text tokens]: each image token's softmax over the text.
                // The logits are computed in the model dtype (as the reference does), the
                // softmax and the averages in float32.
                let probabilities = (image_keys.matmul(&text_queries.transpose(1, 2)) * scale)
                    .softmax(-1, Kind::Float)
                    .mean_dim(0, false, Kind::Float);
                probabilities
                    .narrow(1, start, end - start)
                    .sum_dim_intlist(1, false, Kind::Float)
            })
            .collect();
        let map = Tensor::stack(&maps, 0);
        let mut state = self.state.borrow_mut();
        state.sum = Some(match state.sum.take() {
            Some(sum) => sum + map,
            None => map,
        });
        state.layers += 1;
    }
}

/// How a group of images shares attention in one forward pass.
pub struct GroupAttention {
    /// Images per group (`N`); the forward batch must be exactly one group.
    pub group_size: i64,
    /// Foreground of each image on the token grid, [N, h*w] (non-zero = foreground). `None`
    /// shares every image token unmasked (the reference's first step, `t == 1`).
    pub foreground: Option<Tensor>,
    /// Attention capture for attention-derived masks, if wanted.
    pub capture: Option<AttentionCapture>,
}

/// The keys image `n` borrows from the others: flat indices into the group's image tokens
/// `[N * h*w]` and the RoPE tables of the positions they take in `n`'s key sequence.
struct BorrowedKeys {
    indices: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// [`GroupAttention`] resolved for one forward pass: which tokens each image borrows, with
/// their rotary tables, computed once and used by every layer.
pub struct SharedAttentionPlan<'a> {
    group: &'a GroupAttention,
    image_len: i64,
    borrowed: Vec<BorrowedKeys>,
}

impl<'a> SharedAttentionPlan<'a> {
    /// `img_ids` [h*w, 3] are the single-image position ids the queries use.
    pub fn new(
        group: &'a GroupAttention,
        img_ids: &Tensor,
        batch: i64,
        axes_dims: &[i64],
    ) -> Result<Self> {
        let n = group.group_size;
        if n < 2 {
            bail!("shared attention needs a group of at least 2 images, got {n}");
        }
        if batch != n {
            bail!("shared attention runs one group per forward: batch {batch}, group size {n}");
        }
        let image_len = img_ids.size()[0];
        let device = img_ids.device();
        let foreground = match &group.foreground {
            Some(mask) => {
                if mask.size() != [n, image_len] {
                    bail!(
                        "foreground masks have shape {:?}, expected [{n}, {image_len}] (group, tokens)",
                        mask.size()
                    );
                }
                Some(mask.to_device(device).ne(0.0))
            }
            None => None,
        };
        if let Some(capture) = &group.capture {
            if capture.spans.len() as i64 != n {
                bail!(
                    "attention capture has {} spans for {n} images",
                    capture.spans.len()
                );
            }
        }
        let rows = img_ids.select(1, 1).max().double_value(&[]).round() as i64 + 1;
        let mut borrowed = Vec::with_capacity(n as usize);
        for image in 0..n {
            let mut indices = Vec::with_capacity(n as usize - 1);
            let mut ids = Vec::with_capacity(n as usize - 1);
            for block in 1..n {
                let source = (image - block).rem_euclid(n);
                let tokens = match &foreground {
                    Some(mask) => mask.get(source).nonzero().squeeze_dim(1),
                    None => Tensor::arange(image_len, (Kind::Int64, device)),
                };
                indices.push(&tokens + source * image_len);
                let offset = Tensor::from_slice(&[0f32, (block * rows) as f32, 0.])
                    .to_device(device)
                    .unsqueeze(0);
                ids.push(img_ids.to_kind(Kind::Float).index_select(0, &tokens) + offset);
            }
            let (cos, sin) = rope_tables(&Tensor::cat(&ids, 0), axes_dims);
            borrowed.push(BorrowedKeys {
                indices: Tensor::cat(&indices, 0),
                cos,
                sin,
            });
        }
        Ok(Self {
            group,
            image_len,
            borrowed,
        })
    }

    /// Shared attention over a group's joint sequences: [N, S, heads * head_dim].
    pub fn attend(&self, qkv: &JointQkv, rope: &Rope) -> Tensor {
        let text_len = qkv.text_len;
        let size = qkv.key.size();
        let (heads, head_dim) = (size[2], size[3]);
        let query = apply_rope(&qkv.query, &rope.cos, &rope.sin);
        let key = apply_rope(&qkv.key, &rope.cos, &rope.sin);
        if let Some(capture) = &self.group.capture {
            capture.record(&query, &key, text_len);
        }
        let n = self.group.group_size;
        let flat_shape = [n * self.image_len, heads, head_dim];
        let image_keys = qkv
            .key
            .narrow(1, text_len, self.image_len)
            .reshape(flat_shape);
        let image_values = qkv
            .value
            .narrow(1, text_len, self.image_len)
            .reshape(flat_shape);
        let masked = self.group.foreground.is_some();
        let outputs: Vec<Tensor> = self
            .borrowed
            .iter()
            .enumerate()
            .map(|(image, borrowed)| {
                let image = image as i64;
                let borrowed_keys = apply_rope(
                    &image_keys.index_select(0, &borrowed.indices).unsqueeze(0),
                    &borrowed.cos,
                    &borrowed.sin,
                );
                let borrowed_values = image_values.index_select(0, &borrowed.indices).unsqueeze(0);
                let keys = Tensor::cat(&[key.narrow(0, image, 1), borrowed_keys], 1);
                let values = Tensor::cat(&[qkv.value.narrow(0, image, 1), borrowed_values], 1);
                // Unmasked, every query sees everything; masked, only the image queries see
                // the borrowed tokens (the text queries are handled below).
                let queries = if masked {
                    query
                        .narrow(0, image, 1)
                        .narrow(1, text_len, self.image_len)
                } else {
                    query.narrow(0, image, 1)
                };
                sdpa(&queries, &keys, &values)
            })
            .collect();
        let image_side = Tensor::cat(&outputs, 0);
        if !masked {
            return image_side;
        }
        let text_side = sdpa(&query.narrow(1, 0, text_len), &key, &qkv.value);
        Tensor::cat(&[text_side, image_side], 1)
    }
}

/// Whether the foreground masks apply at transformer time `time` in [0, 1]: the reference
/// shares attention unmasked on the first step (`t == 1`) and masked from then on.
pub fn masks_apply_at(time: f32) -> bool {
    time < 1.0
}

/// Checks that category-word spans fit a text sequence of `text_len` tokens.
pub fn check_spans(spans: &[(i64, i64)], text_len: i64) -> Result<()> {
    for (image, &(start, end)) in spans.iter().enumerate() {
        if !(0 <= start && start < end && end <= text_len) {
            bail!(
                "category token span {start}..{end} of image {image} is outside the {text_len} text tokens"
            );
        }
    }
    Ok(())
}
