//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or the vocabulary stored in a
//! GGUF file: byte-level BPE ("gpt2") turned into the same kind of tokenizer, SentencePiece
//! ("llama") through `spm.rs`.

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};
use crate::spm::Spm;
use serde_json::json;
use std::path::Path;

// One per model: the size difference costs nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Hf(tokenizers::Tokenizer),
    Spm(Spm),
}

pub struct Tokenizer {
    inner: Inner,
    /// Prepended when the format asks for it and the tokenizer does not add it itself.
    bos: Option<u32>,
    /// Appended when the format asks for it (`add_eos_token`).
    eos_add: Option<u32>,
    pub eos_ids: Vec<u32>,
}

impl Tokenizer {
    pub fn from_file(path: &Path, eos_ids: Vec<u32>) -> Result<Tokenizer> {
        // The tokenizers crate panics on some malformed files (a decoder entry of the wrong
        // shape: `expect("Helper")`, found by tests/fuzz.rs): a bad file is an error here.
        let parsed =
            std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(path)).map_err(|_| {
                ModelError::format(path, "cannot load tokenizer: malformed tokenizer.json")
            })?;
        let inner =
            parsed.map_err(|e| ModelError::format(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner: Inner::Hf(inner),
            bos: None,
            eos_add: None,
            eos_ids,
        })
    }

    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let err = |m: String| ModelError::format(&g.path, m);
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("");
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let flag = |k: &str| g.get(k).and_then(Value::as_bool);
        let mut eos_ids: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id(k))
        .collect();
        eos_ids.dedup();
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = g
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| err(format!("missing {key}")))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| err(format!("{key} holds a non-string")))
                })
                .collect()
        };
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        if model == "llama" {
            let tokens = strings("tokenizer.ggml.tokens")?;
            let scores: Vec<f32> = g
                .get("tokenizer.ggml.scores")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
                .unwrap_or_default();
            let n = tokens.len() as u32;
            let known = |i: Option<u32>| i.filter(|&i| i < n);
            let spm = Spm::new(
                tokens,
                scores,
                types,
                known(id("tokenizer.ggml.unknown_token_id")).unwrap_or(0),
                flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            );
            let bos = known(id("tokenizer.ggml.bos_token_id"));
            return Ok(Tokenizer {
                inner: Inner::Spm(spm),
                // SentencePiece models add BOS unless the file says not to.
                bos: bos.filter(|_| flag("tokenizer.ggml.add_bos_token").unwrap_or(true)),
                eos_add: known(id("tokenizer.ggml.eos_token_id"))
                    .filter(|_| flag("tokenizer.ggml.add_eos_token").unwrap_or(false)),
                eos_ids,
            });
        }
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model {model:?} in GGUF is not supported (byte-level BPE \"gpt2\" and \
                 SentencePiece \"llama\" are); use the model's Hugging Face folder with \
                 tokenizer.json instead"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole in the text, as in HF.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, ty)| **ty == 3 || **ty == 4)
            .map(|(i, ty)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": *ty == 3})
            })
            .collect();
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let split = |pattern: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
        };
        let pre_tokenizer = match pre {
            "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "llama3" | "llama-bpe" | "llama-v3" => split(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ),
            "qwen2" => split(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ),
            _ => byte_level,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| err(format!("cannot build the tokenizer stored in GGUF: {e}")))?;
        let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(false);
        Ok(Tokenizer {
            inner: Inner::Hf(inner),
            bos: if add_bos {
                id("tokenizer.ggml.bos_token_id")
            } else {
                None
            },
            eos_add: None,
            eos_ids,
        })
    }

    /// The ids the model sees for `text`: BOS (and EOS) included where the model adds them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Inner::Hf(t) => t
                .encode(text, true)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec(),
            Inner::Spm(t) => t.encode(text),
        };
        if let Some(b) = self.bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        if let Some(e) = self.eos_add {
            ids.push(e);
        }
        Ok(ids)
    }

    /// The text of `ids` as a whole text (SentencePiece drops the space it put at the start).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_as(ids, true)
    }

    /// The text of `ids` where they continue a text (nothing dropped at the start).
    pub fn decode_tail(&self, ids: &[u32]) -> Result<String> {
        self.decode_as(ids, false)
    }

    fn decode_as(&self, ids: &[u32], whole: bool) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Inner::Spm(t) => Ok(t.decode(ids, whole)),
        }
    }

    /// The text of one token as stored in the vocabulary (its piece: `▁the`, `<0x0A>`,
    /// `<|im_end|>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Spm(t) => t.piece(id).map(String::from),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Spm(t) => t.id(token),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm(t) => t.len(),
        }
    }
}

/// Turns a growing list of token ids into text pieces to print, holding back a piece while it
/// ends in an incomplete UTF-8 sequence (a byte-level token can carry half a character).
///
/// Incremental, as text-generation servers do it: only the last few tokens are decoded each
/// time (from `prefix`, one token of context before the unsent ones, so that tokenizers that
/// treat a leading space specially decode the same as in the whole text).
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// Tokens up to here have been sent.
    read: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode_tail(&self.ids[self.prefix..self.read])?;
        let text = tok.decode_tail(&self.ids[self.prefix..])?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= before.len()
            || !text.is_char_boundary(before.len())
        {
            return Ok(String::new());
        }
        let piece = text[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode_tail(&self.ids[self.prefix..self.read])?;
        let text = tok.decode_tail(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text.get(before.len()..).unwrap_or("").to_string())
    }
}
