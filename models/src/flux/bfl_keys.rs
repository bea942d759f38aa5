//! Where each diffusers-named FLUX weight lives in an original BFL single-file checkpoint
//! (`flux1-dev.safetensors`), the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`.
//!
//! BFL fuses Q/K/V (`img_attn.qkv`, `txt_attn.qkv`) and, in single blocks, Q/K/V and the MLP input
//! (`linear1`); they are sliced. The final adaLN projection is stored as (shift, scale) where
//! diffusers expects (scale, shift); the halves are swapped. Files saved by ComfyUI-style tools
//! prefix every key with `model.diffusion_model.`, which is accepted too.

use super::config::{Config, MLP_RATIO};
use crate::weights::{Checkpoint, Source, SourcePart};

const PREFIXED: &str = "model.diffusion_model.";

/// The BFL key mapping for one model size.
pub struct BflKeys {
    prefix: &'static str,
    inner_dim: i64,
    mlp_hidden: i64,
}

impl BflKeys {
    /// The mapping if `checkpoint` is in the BFL layout, `None` if it uses diffusers names.
    pub fn detect(checkpoint: &Checkpoint, config: &Config) -> Option<Self> {
        let prefix = if checkpoint.contains("img_in.weight") {
            ""
        } else if checkpoint.contains(&format!("{PREFIXED}img_in.weight")) {
            PREFIXED
        } else {
            return None;
        };
        Some(Self {
            prefix,
            inner_dim: config.inner_dim(),
            mlp_hidden: config.inner_dim() * MLP_RATIO,
        })
    }

    fn whole(&self, name: &str) -> Source {
        Source::whole(format!("{}{name}", self.prefix))
    }

    fn slice(&self, name: &str, start: i64, len: i64) -> Source {
        Source::slice(format!("{}{name}", self.prefix), 0, start, len)
    }

    /// The source of the diffusers-named variable `name` (`weight` or `bias` last).
    pub fn source(&self, name: &str) -> Source {
        let (module, param) = name.rsplit_once('.').unwrap_or((name, ""));
        let inner = self.inner_dim;
        let parts: Vec<&str> = module.split('.').collect();
        // Renamed modules whose parameter keeps its name.
        let renamed = |bfl_module: String| self.whole(&format!("{bfl_module}.{param}"));
        let sliced = |bfl_module: String, start: i64, len: i64| {
            self.slice(&format!("{bfl_module}.{param}"), start, len)
        };
        match parts.as_slice() {
            ["time_text_embed", embedder, layer] => {
                let bfl = match *embedder {
                    "timestep_embedder" => "time_in",
                    "guidance_embedder" => "guidance_in",
                    "text_embedder" => "vector_in",
                    _ => return self.whole(name),
                };
                let layer = if *layer == "linear_1" {
                    "in_layer"
                } else {
                    "out_layer"
                };
                renamed(format!("{bfl}.{layer}"))
            }
            ["context_embedder"] => renamed("txt_in".into()),
            ["x_embedder"] => renamed("img_in".into()),
            ["proj_out"] => renamed("final_layer.linear".into()),
            ["norm_out", "linear"] => {
                let key = format!("{}final_layer.adaLN_modulation.1.{param}", self.prefix);
                Source::concat(
                    vec![
                        SourcePart {
                            name: key.clone(),
                            narrow: Some((0, inner, inner)),
                        },
                        SourcePart {
                            name: key,
                            narrow: Some((0, 0, inner)),
                        },
                    ],
                    0,
                )
            }
            ["transformer_blocks", i, rest @ ..] => {
                let block = format!("double_blocks.{i}");
                match rest {
                    ["norm1", "linear"] => renamed(format!("{block}.img_mod.lin")),
                    ["norm1_context", "linear"] => renamed(format!("{block}.txt_mod.lin")),
                    ["attn", "to_q"] => sliced(format!("{block}.img_attn.qkv"), 0, inner),
                    ["attn", "to_k"] => sliced(format!("{block}.img_attn.qkv"), inner, inner),
                    ["attn", "to_v"] => sliced(format!("{block}.img_attn.qkv"), 2 * inner, inner),
                    ["attn", "add_q_proj"] => sliced(format!("{block}.txt_attn.qkv"), 0, inner),
                    ["attn", "add_k_proj"] => sliced(format!("{block}.txt_attn.qkv"), inner, inner),
                    ["attn", "add_v_proj"] => {
                        sliced(format!("{block}.txt_attn.qkv"), 2 * inner, inner)
                    }
                    ["attn", "norm_q"] => {
                        self.whole(&format!("{block}.img_attn.norm.query_norm.scale"))
                    }
                    ["attn", "norm_k"] => {
                        self.whole(&format!("{block}.img_attn.norm.key_norm.scale"))
                    }
                    ["attn", "norm_added_q"] => {
                        self.whole(&format!("{block}.txt_attn.norm.query_norm.scale"))
                    }
                    ["attn", "norm_added_k"] => {
                        self.whole(&format!("{block}.txt_attn.norm.key_norm.scale"))
                    }
                    ["attn", "to_out", "0"] => renamed(format!("{block}.img_attn.proj")),
                    ["attn", "to_add_out"] => renamed(format!("{block}.txt_attn.proj")),
                    ["ff", "net", "0", "proj"] => renamed(format!("{block}.img_mlp.0")),
                    ["ff", "net", "2"] => renamed(format!("{block}.img_mlp.2")),
                    ["ff_context", "net", "0", "proj"] => renamed(format!("{block}.txt_mlp.0")),
                    ["ff_context", "net", "2"] => renamed(format!("{block}.txt_mlp.2")),
                    _ => self.whole(name),
                }
            }
            ["single_transformer_blocks", i, rest @ ..] => {
                let block = format!("single_blocks.{i}");
                match rest {
                    ["norm", "linear"] => renamed(format!("{block}.modulation.lin")),
                    ["attn", "to_q"] => sliced(format!("{block}.linear1"), 0, inner),
                    ["attn", "to_k"] => sliced(format!("{block}.linear1"), inner, inner),
                    ["attn", "to_v"] => sliced(format!("{block}.linear1"), 2 * inner, inner),
                    ["proj_mlp"] => sliced(format!("{block}.linear1"), 3 * inner, self.mlp_hidden),
                    ["attn", "norm_q"] => self.whole(&format!("{block}.norm.query_norm.scale")),
                    ["attn", "norm_k"] => self.whole(&format!("{block}.norm.key_norm.scale")),
                    ["proj_out"] => renamed(format!("{block}.linear2")),
                    _ => self.whole(name),
                }
            }
            _ => self.whole(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> BflKeys {
        BflKeys {
            prefix: "",
            inner_dim: 3072,
            mlp_hidden: 12288,
        }
    }

    #[test]
    fn maps_fused_and_swapped_weights() {
        let keys = keys();
        assert_eq!(
            keys.source("transformer_blocks.3.attn.to_k.bias"),
            Source::slice("double_blocks.3.img_attn.qkv.bias", 0, 3072, 3072)
        );
        assert_eq!(
            keys.source("single_transformer_blocks.0.proj_mlp.weight"),
            Source::slice("single_blocks.0.linear1.weight", 0, 9216, 12288)
        );
        assert_eq!(
            keys.source("transformer_blocks.0.attn.norm_added_k.weight"),
            Source::whole("double_blocks.0.txt_attn.norm.key_norm.scale")
        );
        assert_eq!(
            keys.source("time_text_embed.guidance_embedder.linear_2.bias"),
            Source::whole("guidance_in.out_layer.bias")
        );
        let swapped = keys.source("norm_out.linear.weight");
        assert_eq!(swapped.parts[0].narrow, Some((0, 3072, 3072)));
        assert_eq!(swapped.parts[1].narrow, Some((0, 0, 3072)));
    }
}
