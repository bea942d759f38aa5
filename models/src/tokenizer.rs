//! Prompt tokenisation for the text encoders, with the Hugging Face `tokenizers` crate (the
//! same Rust code the Python tokenizers run on).
//!
//! FLUX pads and truncates both prompts to a fixed length (diffusers `FluxPipeline`:
//! `padding="max_length", truncation=True`): 77 tokens for CLIP (the tokenizer's
//! `model_max_length`), 512 for T5 (`max_sequence_length`). The end token survives truncation
//! because the post-processor adds it after the text is cut.
//!
//! A folder with a `tokenizer.json` loads it. The real FLUX `tokenizer/` (CLIP) folder ships
//! only `vocab.json` + `merges.txt`; for it the tokenizer transformers' `CLIPTokenizer` builds
//! is rebuilt here from those files.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's word split, as transformers' `CLIPTokenizer` sets it.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The parts of `tokenizer_config.json` that decide padding.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    tokenizer_class: Option<String>,
    #[serde(default)]
    pad_token: Option<TokenText>,
    #[serde(default)]
    bos_token: Option<TokenText>,
    #[serde(default)]
    eos_token: Option<TokenText>,
    #[serde(default)]
    unk_token: Option<TokenText>,
    #[serde(default)]
    model_max_length: Option<f64>,
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenText {
    Plain(String),
    Added { content: String },
}

impl TokenText {
    fn text(&self) -> &str {
        match self {
            Self::Plain(text) | Self::Added { content: text } => text,
        }
    }
}

/// A tokenizer that turns prompts into fixed-length id rows.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl PromptTokenizer {
    /// Loads a tokenizer folder. `max_length` defaults to the folder's `model_max_length`
    /// (77 for CLIP); give it for T5 (FLUX: 512, its `model_max_length` says 512 too).
    pub fn from_dir(dir: &Path, max_length: Option<usize>) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.exists() {
            crate::loading::read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let json_path = dir.join("tokenizer.json");
        let tokenizer = if json_path.exists() {
            Tokenizer::from_file(&json_path)
                .map_err(|error| anyhow!("{error}"))
                .with_context(|| format!("cannot load tokenizer {}", json_path.display()))?
        } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
            let class = config.tokenizer_class.as_deref().unwrap_or("CLIPTokenizer");
            if !class.starts_with("CLIPTokenizer") {
                bail!(
                    "{} has no tokenizer.json, and vocab.json + merges.txt are only understood for CLIP (tokenizer_class {class})",
                    dir.display()
                );
            }
            clip_from_vocab_and_merges(dir, &config)?
        } else {
            bail!(
                "no tokenizer.json (nor vocab.json + merges.txt) in {}",
                dir.display()
            );
        };
        let max_length = match (max_length, config.model_max_length) {
            (Some(length), _) => length,
            // transformers writes a huge sentinel when there is no limit.
            (None, Some(length)) if length > 0.0 && length < 1e6 => length as usize,
            (None, _) => bail!(
                "{} gives no model_max_length: pass a max length",
                dir.display()
            ),
        };
        let pad_token = config
            .pad_token
            .as_ref()
            .map(TokenText::text)
            .with_context(|| format!("{} names no pad_token", config_path.display()))?
            .to_string();
        Self::new(tokenizer, max_length, &pad_token)
    }

    /// Wraps a tokenizer, padding and truncating to `max_length` with `pad_token`.
    pub fn new(mut tokenizer: Tokenizer, max_length: usize, pad_token: &str) -> Result<Self> {
        let pad_id = tokenizer
            .token_to_id(pad_token)
            .with_context(|| format!("pad token {pad_token:?} is not in the vocabulary"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|error| anyhow!("{error}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_string(),
        }));
        Ok(Self {
            tokenizer,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id rows of `prompts` (each `max_length` long) and their attention masks.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenizedPrompts> {
        let encodings = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|error| anyhow!("{error}"))
            .context("tokenising prompts")?;
        let mut ids = Vec::with_capacity(prompts.len());
        let mut attention_mask = Vec::with_capacity(prompts.len());
        for encoding in encodings {
            ids.push(encoding.get_ids().iter().map(|&id| i64::from(id)).collect());
            attention_mask.push(
                encoding
                    .get_attention_mask()
                    .iter()
                    .map(|&m| i64::from(m))
                    .collect(),
            );
        }
        Ok(TokenizedPrompts {
            ids,
            attention_mask,
        })
    }

    /// For each token of a prompt as the encoder sees it (special tokens, truncation, no
    /// padding), the byte range of the prompt it covers; special tokens cover none (an empty
    /// range). Used to find a word's tokens, however the tokenizer split the word.
    pub fn prompt_offsets(&self, prompt: &str) -> Result<Vec<(usize, usize)>> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|error| anyhow!("{error}"))
            .with_context(|| format!("tokenising {prompt:?}"))?;
        Ok(encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .zip(encoding.get_attention_mask())
            .filter(|(_, &attended)| attended == 1)
            .map(|((&offsets, &special), _)| if special == 1 { (0, 0) } else { offsets })
            .collect())
    }

    /// `(B, max_length)` int64 ids on `device`, as the text encoders take them.
    pub fn encode_to_tensor(&self, prompts: &[&str], device: Device) -> Result<Tensor> {
        Ok(self.encode(prompts)?.ids_tensor(device))
    }
}

/// The token ids of a batch of prompts, all rows padded to the same length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompts {
    pub ids: Vec<Vec<i64>>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<i64>>,
}

impl TokenizedPrompts {
    pub fn ids_tensor(&self, device: Device) -> Tensor {
        rows_to_tensor(&self.ids, device)
    }

    pub fn attention_mask_tensor(&self, device: Device) -> Tensor {
        rows_to_tensor(&self.attention_mask, device)
    }
}

fn rows_to_tensor(rows: &[Vec<i64>], device: Device) -> Tensor {
    let width = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .to_kind(Kind::Int64)
        .view([rows.len() as i64, width])
        .to_device(device)
}

/// The byte-level BPE that transformers' `CLIPTokenizer` assembles from `vocab.json` and
/// `merges.txt`: NFC, whitespace runs collapsed, lower case; CLIP's word split, then bytes;
/// words end in `</w>`; `<|startoftext|> ... <|endoftext|>` around each prompt.
fn clip_from_vocab_and_merges(dir: &Path, config: &TokenizerConfig) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let special = |token: &Option<TokenText>, default: &str| {
        token
            .as_ref()
            .map_or(default.to_string(), |t| t.text().to_string())
    };
    let bos = special(&config.bos_token, "<|startoftext|>");
    let eos = special(&config.eos_token, "<|endoftext|>");
    let unk = special(&config.unk_token, "<|endoftext|>");
    let to_str = |path: &Path| {
        path.to_str()
            .map(str::to_string)
            .with_context(|| format!("path {} is not UTF-8", path.display()))
    };
    let bpe = BPE::from_file(&to_str(&vocab_path)?, &to_str(&merges_path)?)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(unk)
        .build()
        .map_err(|error| anyhow!("{error}"))
        .with_context(|| {
            format!(
                "cannot read {} + {}",
                vocab_path.display(),
                merges_path.display()
            )
        })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let error = |error: tokenizers::Error| anyhow!("{error}");
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(error)?
            .into(),
            Lowercase.into(),
        ])))
        .map_err(error)?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(error)?
        .into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    let id = |token: &str| {
        tokenizer
            .token_to_id(token)
            .with_context(|| format!("{token:?} is not in {}", vocab_path.display()))
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    let mut specials = vec![bos, eos];
    if let Some(pad) = &config.pad_token {
        specials.push(pad.text().to_string());
    }
    specials.dedup();
    tokenizer
        .add_special_tokens(
            specials
                .into_iter()
                .map(|token| AddedToken::from(token, true)),
        )
        .map_err(error)?;
    Ok(tokenizer)
}
