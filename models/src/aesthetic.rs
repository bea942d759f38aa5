//! The LAION aesthetic predictors: heads that map an L2-normalised CLIP ViT-L/14 image embedding
//! to a score (roughly 1-10).
//!
//! Two heads exist and both are supported:
//! - the original linear predictor (`sa_0_4_vit_l_14_linear.pth`, LAION-Aesthetics v1): one
//!   `nn.Linear(768, 1)`, saved bare (keys `weight`, `bias`);
//! - the "improved" predictor (`sac+logos+ava1-l14-linearMSE.pth`, christophschuhmann/
//!   improved-aesthetic-predictor): `nn.Sequential` of Linear 768->1024, Dropout, 1024->128,
//!   Dropout, 128->64, Dropout, 64->16, 16->1 with no activations (keys `layers.0`, `layers.2`,
//!   `layers.4`, `layers.6`, `layers.7`).
//!
//! Both ship as PyTorch pickles; [`convert_pickle`] turns one into a safetensors file with the
//! same tensor names, which [`AestheticHead::load`] reads. The kind is recognised from the keys.
//! The input width is read from the first weight, so the heads also load for the tiny CLIP
//! configurations of the tests; the hidden widths of the MLP are fixed by the architecture.

use crate::torch_pickle::read_state_dict;
use crate::weights::{same_names, Checkpoint};
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// The hidden widths of the improved predictor's MLP, after the input.
const MLP_WIDTHS: [i64; 5] = [1024, 128, 64, 16, 1];
/// The `nn.Sequential` indices of its five Linear layers (the others are Dropouts).
const MLP_LAYER_INDICES: [usize; 5] = [0, 2, 4, 6, 7];

/// Which predictor a head is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AestheticHeadKind {
    /// The original LAION linear predictor.
    Linear,
    /// The improved LAION MLP predictor.
    Mlp,
}

impl std::str::FromStr for AestheticHeadKind {
    type Err = anyhow::Error;

    /// `linear` or `mlp`, as in configuration files.
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "mlp" => Ok(Self::Mlp),
            other => bail!("unknown aesthetic head kind {other:?} (linear or mlp)"),
        }
    }
}

impl AestheticHeadKind {
    /// Recognises a head from its tensor names.
    pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let names: Vec<&str> = names.into_iter().collect();
        let has = |name: &str| names.contains(&name);
        if has("layers.0.weight") {
            Ok(Self::Mlp)
        } else if has("weight") && has("bias") {
            Ok(Self::Linear)
        } else {
            bail!(
                "not a LAION aesthetic head: expected `weight` + `bias` (linear predictor) or \
                 `layers.0.weight`, ... `layers.7.weight` (improved MLP predictor), found {names:?}"
            )
        }
    }

    /// The tensor names a head of this kind has.
    pub fn tensor_names(self) -> Vec<String> {
        let prefixes: Vec<String> = match self {
            Self::Linear => vec![String::new()],
            Self::Mlp => MLP_LAYER_INDICES
                .iter()
                .map(|i| format!("layers.{i}."))
                .collect(),
        };
        prefixes
            .iter()
            .flat_map(|prefix| [format!("{prefix}weight"), format!("{prefix}bias")])
            .collect()
    }
}

/// A loaded aesthetic head.
#[derive(Debug)]
pub struct AestheticHead {
    kind: AestheticHeadKind,
    input_dim: i64,
    _vs: nn::VarStore,
    layers: Vec<nn::Linear>,
}

impl AestheticHead {
    /// Loads a converted head (safetensors). `expected` checks the kind when given.
    pub fn load(path: &Path, expected: Option<AestheticHeadKind>, device: Device) -> Result<Self> {
        let checkpoint = Checkpoint::open_file(path)?;
        Self::from_checkpoint(&checkpoint, expected, device)
            .with_context(|| format!("loading the aesthetic head {}", path.display()))
    }

    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        expected: Option<AestheticHeadKind>,
        device: Device,
    ) -> Result<Self> {
        let kind = AestheticHeadKind::detect(checkpoint.names())?;
        if let Some(expected) = expected {
            ensure!(
                expected == kind,
                "the head is a {kind:?} predictor, the configuration asks for {expected:?}"
            );
        }
        let first = match kind {
            AestheticHeadKind::Linear => "weight",
            AestheticHeadKind::Mlp => "layers.0.weight",
        };
        let input_dim = match checkpoint.shape(first) {
            Some(&[_, input]) => input,
            other => bail!("{first} should be a matrix, its shape is {other:?}"),
        };
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let layers = match kind {
            AestheticHeadKind::Linear => vec![nn::linear(&root, input_dim, 1, Default::default())],
            AestheticHeadKind::Mlp => {
                let mut width = input_dim;
                MLP_LAYER_INDICES
                    .iter()
                    .zip(MLP_WIDTHS)
                    .map(|(index, out)| {
                        let layer =
                            nn::linear(&root / "layers" / *index, width, out, Default::default());
                        width = out;
                        layer
                    })
                    .collect()
            }
        };
        checkpoint.load_into(&mut vs, &same_names)?;
        Ok(Self {
            kind,
            input_dim,
            _vs: vs,
            layers,
        })
    }

    pub fn kind(&self) -> AestheticHeadKind {
        self.kind
    }

    /// The embedding width the head takes (768 for the released heads).
    pub fn input_dim(&self) -> i64 {
        self.input_dim
    }

    /// `embeds`: `[batch, input_dim]`, L2-normalised CLIP image embeddings. Returns the scores,
    /// `[batch]`, in float32 (the head runs in float32 whatever the embeddings' dtype).
    pub fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let size = embeds.size();
        ensure!(
            size.len() == 2 && size[1] == self.input_dim,
            "the aesthetic head expects embeddings of shape [batch, {}], got {size:?}",
            self.input_dim
        );
        let x = self
            .layers
            .iter()
            .fold(embeds.to_kind(Kind::Float), |x, layer| layer.forward(&x));
        Ok(x.squeeze_dim(1))
    }
}

/// Converts a head saved by `torch.save(state_dict)` (the zip format PyTorch writes since 1.6,
/// read by [`read_state_dict`] without executing pickle code) into a safetensors file with the same tensor names, in float32. Checks that the tensors form a
/// head of a known kind with consistent shapes before writing, and returns the kind.
pub fn convert_pickle(input: &Path, output: &Path) -> Result<AestheticHeadKind> {
    let tensors = read_state_dict(input)
        .with_context(|| format!("cannot read {} as a PyTorch state dict", input.display()))?;
    let kind = AestheticHeadKind::detect(tensors.iter().map(|(name, _)| name.as_str()))
        .with_context(|| format!("in {}", input.display()))?;
    let wanted = kind.tensor_names();
    let selected: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter(|(name, _)| wanted.contains(name))
        .map(|(name, tensor)| (name, tensor.to_kind(Kind::Float).contiguous()))
        .collect();
    crate::weights::write_all(output, &selected)?;
    // Loading the written file checks every name and shape.
    if let Err(error) = AestheticHead::load(output, Some(kind), Device::Cpu) {
        // Leave no half-valid head behind for a later run to pick up.
        let _ = std::fs::remove_file(output);
        return Err(error.context(format!(
            "{} does not hold a consistent {kind:?} head",
            input.display()
        )));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_recognised_from_names() {
        assert_eq!(
            AestheticHeadKind::detect(["weight", "bias"]).unwrap(),
            AestheticHeadKind::Linear
        );
        let mlp = AestheticHeadKind::Mlp.tensor_names();
        assert_eq!(mlp.len(), 10);
        assert_eq!(mlp[8], "layers.7.weight");
        assert_eq!(
            AestheticHeadKind::detect(mlp.iter().map(String::as_str)).unwrap(),
            AestheticHeadKind::Mlp
        );
        let error = AestheticHeadKind::detect(["fc.weight"]).unwrap_err();
        assert!(format!("{error}").contains("not a LAION aesthetic head"));
    }
}
