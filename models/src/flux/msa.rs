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
//! attention kernels stay usable. No `[N (T + L)]²` tensor is ever formed.
//!
//! A forward pass may hold several groups of the same images (true CFG's positive and negative
//! halves): each image's queries of every group go through one attention call, against its own
//! group's keys. Which tokens are borrowed ([`SharedKeys`]) is computed once per set of masks.
//!
//! The same pass can capture, for the deformable-object masks, each image's text-to-image
//! attention to its category word ([`AttentionCapture`]).

use super::attention::{sdpa, JointQkv, Rope};
use super::embeddings::{apply_rope, rope_tables};
use anyhow::{bail, Result};
use std::cell::RefCell;
use tch::{Device, Kind, Tensor};

/// Accumulates, over the layers of one forward pass, each image's attention from its image
/// tokens to the tokens of its category word.
///
/// Per layer: logits `scale * q_text . k_image` (after RoPE) are soft-maxed over the text tokens
/// for every image token, summed over the word's token span and averaged over heads, giving an
/// `[N, h*w]` map that is summed over layers here.
///
/// That is an attention call with the image keys as queries, the text queries as keys and, as
/// values, the indicator of the word's tokens: its output is the span's share of each softmax.
/// It runs on the fused kernels, which keep the softmax in float32 on chip, instead of writing
/// the `[heads, h*w, text]` probabilities of every image and layer to memory and reading them
/// back (at 1024², about 100 GB of memory traffic in a deformable step). In float32 it is the
/// reference's computation to float32's precision. In bfloat16 the rounding moves: the reference
/// rounds the logits to bfloat16 and soft-maxes in float32, the kernel computes the logits in
/// float32 and rounds each head's share to bfloat16 before the float32 average.
pub struct AttentionCapture {
    /// Per image, the half-open token range `[start, end)` of the category word.
    spans: Vec<(i64, i64)>,
    state: RefCell<CaptureState>,
}

#[derive(Default)]
struct CaptureState {
    sum: Option<Tensor>,
    layers: usize,
    /// The values of the capture's attention call, made once per forward shape.
    indicator: Option<Tensor>,
}

impl AttentionCapture {
    pub fn new(spans: Vec<(i64, i64)>) -> Self {
        Self {
            spans,
            state: RefCell::new(CaptureState::default()),
        }
    }

    /// The sum over the layers seen since the last call, [N, h*w] float32, and the layer count.
    pub fn take(&self) -> Option<(Tensor, usize)> {
        let mut state = self.state.borrow_mut();
        let layers = std::mem::take(&mut state.layers);
        state.sum.take().map(|sum| (sum, layers))
    }

    /// `query` and `key`: [N, text + h*w, heads, head_dim], one row per image of the group.
    fn record(&self, query: &Tensor, key: &Tensor, text_len: i64) {
        let size = key.size();
        let (images, image_len, heads) = (size[0], size[1] - text_len, size[2]);
        let image_keys = key.narrow(1, text_len, image_len);
        let text_queries = query.narrow(1, 0, text_len);
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        let indicator = self.indicator(&mut state.indicator, &text_queries);
        // [N, h*w, heads * head_dim]; feature 0 of each head is the span's probability mass.
        let shares = sdpa(&image_keys, &text_queries, indicator)
            .view([images, image_len, heads, -1])
            .select(3, 0);
        let map = shares.mean_dim(2, false, Kind::Float);
        state.sum = Some(match state.sum.take() {
            Some(sum) => sum + map,
            None => map,
        });
        state.layers += 1;
    }

    /// [N, text, heads, head_dim] values shaped like `text_queries`: 1 in feature 0 of every
    /// head for the tokens of the image's category word, 0 elsewhere. Kept while the shape,
    /// dtype and device stay those of the pass.
    fn indicator<'s>(&self, kept: &'s mut Option<Tensor>, text_queries: &Tensor) -> &'s Tensor {
        let size = text_queries.size();
        let fits = |indicator: &Tensor| {
            indicator.size() == size
                && indicator.kind() == text_queries.kind()
                && indicator.device() == text_queries.device()
        };
        if !kept.as_ref().is_some_and(fits) {
            let indicator = Tensor::zeros(size.as_slice(), (Kind::Float, Device::Cpu));
            for (image, &(start, end)) in self.spans.iter().enumerate() {
                let _ = indicator
                    .get(image as i64)
                    .narrow(0, start, end - start)
                    .select(2, 0)
                    .fill_(1.0);
            }
            *kept = Some(
                indicator
                    .to_device(text_queries.device())
                    .to_kind(text_queries.kind()),
            );
        }
        kept.as_ref().expect("the indicator was just made")
    }
}

/// How the images of a forward pass share attention: the batch is one or more groups of
/// [`SharedKeys::group_size`] images (several groups: the positive and negative halves of
/// classifier-free guidance, which share attention with the same masks), each group sharing
/// only within itself.
pub struct GroupAttention<'a> {
    pub keys: &'a SharedKeys,
    /// Captures the category-word attention of the batch's first group (the positive prompts).
    pub capture: Option<&'a AttentionCapture>,
}

/// The keys image `n` borrows from the others: flat indices into the group's image tokens
/// `[N * h*w]` and the RoPE tables of the positions they take in `n`'s key sequence.
struct BorrowedKeys {
    indices: Tensor,
    cos: Tensor,
    sin: Tensor,
}

/// Which image tokens each image of a group borrows from the others, with their rotary tables:
/// computed from the foreground masks once and used by every layer of every forward pass that
/// shares attention with those masks (a rigid group's masks never change, so its whole run
/// computes this twice: unmasked for the first step, masked for the rest).
pub struct SharedKeys {
    group_size: i64,
    image_len: i64,
    masked: bool,
    borrowed: Vec<BorrowedKeys>,
}

impl SharedKeys {
    /// `foreground` [N, h*w] (non-zero = foreground) for a group of `group_size` images, `None`
    /// to share every image token (the reference's first step); `img_ids` [h*w, 3] are the
    /// single-image position ids the queries use, on a grid `rows` tokens tall.
    ///
    /// With masks, the foreground token lists are read back to the host once (their lengths
    /// size the gathered key sequences): the one synchronisation of a masked step.
    pub fn new(
        group_size: i64,
        foreground: Option<&Tensor>,
        img_ids: &Tensor,
        rows: i64,
        axes_dims: &[i64],
    ) -> Result<Self> {
        let n = group_size;
        if n < 2 {
            bail!("shared attention needs a group of at least 2 images, got {n}");
        }
        let image_len = img_ids.size()[0];
        let device = img_ids.device();
        let tokens: Vec<Tensor> = match foreground {
            Some(mask) => {
                if mask.size() != [n, image_len] {
                    bail!(
                        "foreground masks have shape {:?}, expected [{n}, {image_len}] (group, tokens)",
                        mask.size()
                    );
                }
                // One nonzero over the group: (image, token) pairs in image order.
                let pairs = mask.ne(0.0).nonzero().to_device(Device::Cpu);
                let pairs = Vec::<i64>::try_from(pairs.flatten(0, -1))?;
                let mut per_image = vec![Vec::new(); n as usize];
                for pair in pairs.chunks_exact(2) {
                    per_image[pair[0] as usize].push(pair[1]);
                }
                per_image
                    .iter()
                    .map(|own| Tensor::from_slice(own).to_device(device))
                    .collect()
            }
            None => (0..n)
                .map(|_| Tensor::arange(image_len, (Kind::Int64, device)))
                .collect(),
        };
        let img_ids = img_ids.to_kind(Kind::Float);
        let mut borrowed = Vec::with_capacity(n as usize);
        for image in 0..n {
            let mut indices = Vec::with_capacity(n as usize - 1);
            let mut ids = Vec::with_capacity(n as usize - 1);
            for block in 1..n {
                let source = (image - block).rem_euclid(n);
                let source_tokens = &tokens[source as usize];
                indices.push(source_tokens + source * image_len);
                // Block `block` sits `block * rows` rows down the reference's tall grid.
                let offset = Tensor::from_slice(&[0f32, (block * rows) as f32, 0.])
                    .to_device(device)
                    .unsqueeze(0);
                ids.push(img_ids.index_select(0, source_tokens) + offset);
            }
            let (cos, sin) = rope_tables(&Tensor::cat(&ids, 0), axes_dims);
            borrowed.push(BorrowedKeys {
                indices: Tensor::cat(&indices, 0),
                cos,
                sin,
            });
        }
        Ok(Self {
            group_size: n,
            image_len,
            masked: foreground.is_some(),
            borrowed,
        })
    }

    pub fn group_size(&self) -> i64 {
        self.group_size
    }
}

impl GroupAttention<'_> {
    /// Checks the pass's batch and text length against the group.
    pub fn check(&self, batch: i64, text_len: i64) -> Result<()> {
        let n = self.keys.group_size;
        if batch % n != 0 {
            bail!("shared attention runs whole groups: batch {batch}, group size {n}");
        }
        if let Some(capture) = self.capture {
            if capture.spans.len() as i64 != n {
                bail!(
                    "attention capture has {} spans for {n} images",
                    capture.spans.len()
                );
            }
            check_spans(&capture.spans, text_len)?;
        }
        Ok(())
    }

    /// Shared attention over the joint sequences of whole groups: [G*N, S, heads * head_dim].
    pub fn attend(&self, qkv: &JointQkv, rope: &Rope) -> Tensor {
        let keys = self.keys;
        let n = keys.group_size;
        let text_len = qkv.text_len;
        let size = qkv.key.size();
        let (batch, heads, head_dim) = (size[0], size[2], size[3]);
        let groups = batch / n;
        let query = apply_rope(&qkv.query, &rope.cos, &rope.sin);
        let key = apply_rope(&qkv.key, &rope.cos, &rope.sin);
        if let Some(capture) = self.capture {
            capture.record(&query.narrow(0, 0, n), &key.narrow(0, 0, n), text_len);
        }
        // [G, N * h*w, heads, head_dim]: each group's image tokens, to gather borrowed ones from.
        let grouped = [groups, n * keys.image_len, heads, head_dim];
        let image_keys = qkv.key.narrow(1, text_len, keys.image_len).reshape(grouped);
        let image_values = qkv
            .value
            .narrow(1, text_len, keys.image_len)
            .reshape(grouped);
        // One image of the group in every group of the batch: [G, S, heads, head_dim], a strided
        // view of the batch's rows image, image + N, ...
        let of_image = |joint: &Tensor, image: i64| {
            let size = joint.size();
            joint
                .reshape([groups, n, size[1], size[2], size[3]])
                .select(1, image)
        };
        let outputs: Vec<Tensor> = keys
            .borrowed
            .iter()
            .enumerate()
            .map(|(image, borrowed)| {
                let image = image as i64;
                let borrowed_keys = apply_rope(
                    &image_keys.index_select(1, &borrowed.indices),
                    &borrowed.cos,
                    &borrowed.sin,
                );
                let borrowed_values = image_values.index_select(1, &borrowed.indices);
                let own_keys = of_image(&key, image);
                let own_values = of_image(&qkv.value, image);
                let all_keys = Tensor::cat(&[own_keys, borrowed_keys], 1);
                let all_values = Tensor::cat(&[own_values, borrowed_values], 1);
                // Unmasked, every query sees everything; masked, only the image queries see
                // the borrowed tokens (the text queries are handled below).
                let queries = of_image(&query, image);
                let queries = if keys.masked {
                    queries.narrow(1, text_len, self.keys.image_len)
                } else {
                    queries
                };
                sdpa(&queries, &all_keys, &all_values)
            })
            .collect();
        // Back from [image][group] order to the batch's group-major order.
        let image_side = Tensor::stack(&outputs, 1).flatten(0, 1);
        if !keys.masked {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The capture as a plain computation: every image token's softmax over the text written out
    /// in float32, averaged over heads, summed over the word's tokens.
    fn materialised(query: &Tensor, key: &Tensor, text_len: i64, spans: &[(i64, i64)]) -> Tensor {
        let image_len = key.size()[1] - text_len;
        let scale = 1.0 / (*query.size().last().unwrap() as f64).sqrt();
        let maps: Vec<Tensor> = spans
            .iter()
            .enumerate()
            .map(|(image, &(start, end))| {
                let text_queries = query.get(image as i64).narrow(0, 0, text_len);
                let image_keys = key.get(image as i64).narrow(0, text_len, image_len);
                // [heads, image tokens, text tokens]
                let logits = image_keys
                    .transpose(0, 1)
                    .matmul(&text_queries.transpose(0, 1).transpose(1, 2))
                    * scale;
                logits
                    .softmax(-1, Kind::Float)
                    .mean_dim(0, false, Kind::Float)
                    .narrow(1, start, end - start)
                    .sum_dim_intlist(1, false, Kind::Float)
            })
            .collect();
        Tensor::stack(&maps, 0)
    }

    #[test]
    fn the_capture_is_the_span_share_of_each_image_tokens_softmax_over_the_text() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(7);
        let (images, text_len, image_len, heads, head_dim) = (3, 12, 20, 4, 16);
        let options = (Kind::Float, Device::Cpu);
        let query = Tensor::randn([images, text_len + image_len, heads, head_dim], options) * 2.0;
        let key = Tensor::randn([images, text_len + image_len, heads, head_dim], options) * 2.0;
        // A word of one token, of several, and one ending the text.
        let spans = vec![(0, 1), (3, 7), (9, 12)];
        let capture = AttentionCapture::new(spans.clone());
        for _ in 0..2 {
            capture.record(&query, &key, text_len);
        }
        let (sum, layers) = capture.take().expect("two layers recorded");
        assert_eq!(layers, 2);
        assert_eq!(sum.size(), [images, image_len]);
        let expected = materialised(&query, &key, text_len, &spans) * 2.0;
        let error = (&sum - &expected).abs().max().double_value(&[]);
        assert!(error < 1e-5, "capture differs by {error}");
        // The values compared are real shares, neither empty nor whole, in each of the two layers.
        assert!(expected.min().double_value(&[]) > 0.0);
        assert!(expected.max().double_value(&[]) < 2.0);
        assert!(capture.take().is_none(), "take empties the capture");
    }
}
