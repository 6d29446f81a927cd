//! The CLIP BPE tokenizer, built like transformers' `CLIPTokenizer` (transformers 5,
//! `models/clip/tokenization_clip.py`, a `tokenizers` pipeline) and called the way diffusers'
//! `encode_prompt` calls it: `tokenizer(text, padding="max_length", max_length=model_max_length,
//! truncation=True)`.
//!
//! The pipeline, stage by stage:
//! - named special tokens (bos, eos, unk, pad) are matched first as whole added tokens, so SD 2.x's pad
//!   token `!` is always id `vocab["!"]`, never `!</w>`;
//! - normalizer: NFC, every whitespace run becomes one space, lowercase;
//! - pre-tokenizer: CLIP's regex (`'s|'t|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, everything else dropped),
//!   then GPT-2 byte-level mapping (with its own regex split);
//! - model: BPE over vocab.json/merges.txt with end-of-word suffix `</w>`, unknown symbols become `unk`;
//! - post-processor: `<|startoftext|> ... <|endoftext|>`, truncated to `model_max_length` keeping the EOS,
//!   right-padded with the pad token to exactly `model_max_length` ids.
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenizer regex (transformers' `CLIPTokenizer`); text between matches is dropped.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Used when the tokenizer folder names no `model_max_length` (every SD text encoder has 77 positions).
const DEFAULT_MAX_LENGTH: usize = 77;

/// One named special token as the configs give it: a plain string, or an `AddedToken` object.
#[derive(Debug, Clone)]
struct SpecialSpec {
    content: String,
    normalized: Option<bool>,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl SpecialSpec {
    fn plain(content: &str) -> Self {
        SpecialSpec {
            content: content.into(),
            normalized: None,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    fn parse(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Self::plain(s)),
            Value::Object(o) => {
                let flag = |k: &str| o.get(k).and_then(Value::as_bool);
                Some(SpecialSpec {
                    content: o.get("content")?.as_str()?.to_string(),
                    normalized: flag("normalized"),
                    lstrip: flag("lstrip").unwrap_or(false),
                    rstrip: flag("rstrip").unwrap_or(false),
                    single_word: flag("single_word").unwrap_or(false),
                })
            }
            _ => None,
        }
    }
}

/// transformers' `CLIPTokenizer` as diffusers' pipelines call it. See the module docs for the pipeline.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: i64,
    bos_id: i64,
    eos_id: i64,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn vocab_from_value(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let obj = v.as_object().ok_or_else(|| Error::config(path, "the vocabulary is not a JSON object"))?;
    obj.iter()
        .map(|(k, id)| {
            let id = id
                .as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .ok_or_else(|| Error::config(path, format!("token `{k}` has id {id}, not a token id")))?;
            Ok((k.clone(), id as u32))
        })
        .collect()
}

/// merges.txt: an optional `#version` line, then one `left right` pair a line.
fn merges_from_text(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.into(), b.into())),
            _ => {
                return Err(Error::config(
                    path,
                    format!("line {} is not a merge `left right`: {line:?}", i + 1),
                ))
            }
        }
    }
    Ok(merges)
}

/// tokenizer.json's `model.merges`: `["a b", ...]` or `[["a", "b"], ...]`.
fn merges_from_value(v: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let list = v.as_array().ok_or_else(|| Error::config(path, "model.merges is not a list"))?;
    list.iter()
        .map(|m| {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| Error::config(path, format!("model.merges holds {m}, not a merge")))
        })
        .collect()
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::config(path, format!("cannot build the CLIP tokenizer: {e}"))
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json` and `merges.txt` (or, failing both, the vocabulary
    /// and merges inside `tokenizer.json`), with `tokenizer_config.json` and `special_tokens_map.json` where
    /// present for the special tokens and `model_max_length` (default 77).
    pub fn from_dir(tokenizer_dir: &Path) -> Result<Self> {
        let vocab_path = tokenizer_dir.join("vocab.json");
        let merges_path = tokenizer_dir.join("merges.txt");
        let json_path = tokenizer_dir.join("tokenizer.json");
        let tokenizer_json = if !vocab_path.is_file() && !merges_path.is_file() && json_path.is_file() {
            Some(read_json(&json_path)?)
        } else {
            None
        };

        let (vocab, merges, origin) = match &tokenizer_json {
            Some(tj) => {
                let model = tj.get("model").ok_or_else(|| Error::config(&json_path, "no `model` section"))?;
                let vocab = vocab_from_value(
                    model.get("vocab").ok_or_else(|| Error::config(&json_path, "no `model.vocab`"))?,
                    &json_path,
                )?;
                let merges = merges_from_value(
                    model.get("merges").ok_or_else(|| Error::config(&json_path, "no `model.merges`"))?,
                    &json_path,
                )?;
                (vocab, merges, json_path.clone())
            }
            None => {
                let vocab = vocab_from_value(&read_json(&vocab_path)?, &vocab_path)?;
                let text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
                (vocab, merges_from_text(&text, &merges_path)?, vocab_path.clone())
            }
        };

        // Special tokens: tokenizer_config.json overrides special_tokens_map.json; transformers' defaults else.
        let config_path = tokenizer_dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?;
        let special_map = read_json_if_present(&tokenizer_dir.join("special_tokens_map.json"))?;
        let special = |key: &str, default: &str| -> SpecialSpec {
            [config.as_ref(), special_map.as_ref()]
                .into_iter()
                .flatten()
                .find_map(|c| c.get(key).and_then(SpecialSpec::parse))
                .unwrap_or_else(|| SpecialSpec::plain(default))
        };
        let bos = special("bos_token", "<|startoftext|>");
        let eos = special("eos_token", "<|endoftext|>");
        let unk = special("unk_token", "<|endoftext|>");
        let pad = special("pad_token", "<|endoftext|>");

        let max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_u64() {
                // transformers writes a huge sentinel (1e30) for "no limit"; the text encoder has 77 positions.
                Some(n) if (2..=1 << 20).contains(&n) => n as usize,
                _ if v.as_f64().is_some_and(|f| f > 1e20) => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(Error::config(&config_path, format!("model_max_length {v} is not a length")))
                }
            },
        };

        // The added-token flags tokenizer.json recorded, where the folder has one.
        let recorded: HashMap<String, SpecialSpec> = tokenizer_json
            .as_ref()
            .and_then(|tj| tj.get("added_tokens"))
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(SpecialSpec::parse).map(|s| (s.content.clone(), s)).collect())
            .unwrap_or_default();

        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .unk_token(unk.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(&origin, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormSequence::new(vec![
            NFC.into(),
            Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| tok_err(&origin, e))?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer.with_normalizer(Some(normalizer));
        let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tok_err(&origin, e))?;
        tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));

        // Named special tokens become added tokens (in the base vocabulary, or appended after it).
        let mut added = Vec::new();
        for s in [&bos, &eos, &unk, &pad] {
            if added.iter().any(|a: &AddedToken| a.content == s.content) {
                continue;
            }
            let s = recorded.get(&s.content).unwrap_or(s);
            added.push(
                AddedToken::from(s.content.clone(), true)
                    .normalized(s.normalized.unwrap_or(false))
                    .lstrip(s.lstrip)
                    .rstrip(s.rstrip)
                    .single_word(s.single_word),
            );
        }
        tokenizer.add_special_tokens(&added);
        let id_of = |s: &SpecialSpec| -> Result<u32> {
            tokenizer.token_to_id(&s.content).ok_or_else(|| {
                Error::config(&origin, format!("special token `{}` is not in the vocabulary", s.content))
            })
        };
        let (bos_id, eos_id, pad_id) = (id_of(&bos)?, id_of(&eos)?, id_of(&pad)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos.content.clone(), eos_id), (bos.content.clone(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err(&origin, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.content.clone(),
        }));
        Ok(ClipTokenizer {
            tokenizer,
            max_length,
            pad_id: pad_id as i64,
            bos_id: bos_id as i64,
            eos_id: eos_id as i64,
        })
    }

    /// The ids of `<|startoftext|> text <|endoftext|>`, truncated and padded to exactly
    /// [`ClipTokenizer::max_length`] ids.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::invalid("prompt", format!("cannot tokenize {text:?}: {e}")))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        if ids.len() != self.max_length {
            return Err(Error::Model(format!(
                "tokenizer produced {} ids for {text:?}, expected {}",
                ids.len(),
                self.max_length
            )));
        }
        Ok(ids)
    }

    /// `model_max_length`: the number of ids [`ClipTokenizer::encode`] returns (77 for every SD model).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }
}
