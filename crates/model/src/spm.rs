//! SentencePiece vocabularies stored in GGUF files (`tokenizer.ggml.model = "llama"`: Llama 2,
//! Mistral, TinyLlama, Gemma). Encoding follows SentencePiece's BPE as llama.cpp implements it:
//! the text's spaces become `▁` (with one prepended when `add_space_prefix`), the characters are
//! merged pairwise, always the adjacent pair whose merged piece has the highest score (the
//! leftmost on ties), and characters that are no piece fall back to their UTF-8 bytes
//! (`<0x00>`..`<0xFF>`). Control and user-defined tokens written in the text are matched
//! whole. The `tokenizers` crate cannot run this model from a GGUF (it has scores, not merge
//! rules), hence this module.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

const SPACE: &str = "\u{2581}";

/// GGUF token types.
pub const NORMAL: u64 = 1;
pub const UNKNOWN: u64 = 2;
pub const CONTROL: u64 = 3;
pub const USER_DEFINED: u64 = 4;
pub const UNUSED: u64 = 5;
pub const BYTE: u64 = 6;

pub struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<u64>,
    ids: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    unk: u32,
    add_space_prefix: bool,
    /// Control and user-defined tokens, matched whole in the text (leftmost, then longest).
    specials: Option<(aho_corasick::AhoCorasick, Vec<u32>)>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap pops the highest score first, the leftmost pair on ties.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// One symbol of the text being merged: a byte range, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// `pieces`, `scores` and `types` are the GGUF arrays (one entry per id; missing scores
    /// and types default to 0 and normal).
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<u64>,
        unk: u32,
        add_space_prefix: bool,
    ) -> Spm {
        let n = pieces.len();
        let scores = (0..n)
            .map(|i| scores.get(i).copied().unwrap_or(0.0))
            .collect();
        let types: Vec<u64> = (0..n)
            .map(|i| types.get(i).copied().unwrap_or(NORMAL))
            .collect();
        let mut ids = HashMap::with_capacity(n);
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            ids.entry(p.clone()).or_insert(i as u32);
            if types[i] == BYTE
                && let Some(b) = parse_byte(p)
            {
                bytes[b as usize] = Some(i as u32);
            }
            if (types[i] == CONTROL || types[i] == USER_DEFINED) && !p.is_empty() {
                specials.push((p.clone(), i as u32));
            }
        }
        let specials = (!specials.is_empty())
            .then(|| {
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(specials.iter().map(|s| s.0.as_str()))
                    .ok()
                    .map(|ac| (ac, specials.iter().map(|s| s.1).collect()))
            })
            .flatten();
        Spm {
            pieces,
            scores,
            types,
            ids,
            bytes,
            unk,
            add_space_prefix,
            specials,
        }
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// The ids of `text` (no BOS/EOS: the caller adds them).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // As llama.cpp: each stretch of plain text (the whole input, or what lies between
        // special tokens) is encoded on its own, with the space prefix.
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token; the longest among those at the same place.
            let hit = self.specials.as_ref().and_then(|(ac, ids)| {
                ac.find(rest)
                    .map(|m| (m.start(), m.len(), ids[m.pattern().as_usize()]))
            });
            let (plain, next) = match hit {
                Some((at, len, id)) => (&rest[..at], Some((at + len, id))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                self.encode_plain(plain, &mut out);
            }
            match next {
                Some((end, id)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            s.push_str(SPACE);
        }
        s.push_str(&text.replace(' ', SPACE));
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in s.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut heap = BinaryHeap::new();
        // Merged text -> the two symbols it came from, to split pieces that are no token.
        let mut merged: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
        let add =
            |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: Option<usize>, r: Option<usize>| {
                let (Some(l), Some(r)) = (l, r) else { return };
                let (a, b) = (syms[l], syms[r]);
                let piece = &s[a.start..b.start + b.len];
                if let Some(&id) = self.ids.get(piece) {
                    heap.push(Bigram {
                        left: l,
                        right: r,
                        score: self.scores[id as usize],
                        size: piece.len(),
                    });
                }
            };
        for i in 1..syms.len() {
            add(&mut heap, &syms, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Outdated: one side has been merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size || l.next != Some(b.right) {
                continue;
            }
            merged.insert((l.start, b.size), (l.len, r.len));
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(b.left);
            }
            add(&mut heap, &syms, syms[b.left].prev, Some(b.left));
            add(&mut heap, &syms, Some(b.left), syms[b.left].next);
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            self.resegment(&s, syms[k].start, syms[k].len, &merged, out);
            i = syms[k].next;
        }
    }

    fn resegment(
        &self,
        s: &str,
        start: usize,
        len: usize,
        merged: &HashMap<(usize, usize), (usize, usize)>,
        out: &mut Vec<u32>,
    ) {
        let piece = &s[start..start + len];
        if let Some(&id) = self.ids.get(piece) {
            out.push(id);
            return;
        }
        if let Some(&(a, b)) = merged.get(&(start, len)) {
            self.resegment(s, start, a, merged, out);
            self.resegment(s, start + a, b, merged, out);
            return;
        }
        for b in piece.bytes() {
            out.push(self.bytes[b as usize].unwrap_or(self.unk));
        }
    }

    /// The text of `ids`: `▁` as spaces, byte pieces as their bytes (invalid UTF-8 becomes
    /// U+FFFD), control tokens as nothing; with `strip_first`, the space that
    /// `add_space_prefix` put at the start is removed, as SentencePiece's decoder does.
    pub fn decode(&self, ids: &[u32], strip_first: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let i = id as usize;
            let Some(p) = self.pieces.get(i) else {
                continue;
            };
            match self.types[i] {
                CONTROL | UNUSED => {}
                BYTE => match parse_byte(p) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(p.as_bytes()),
                },
                UNKNOWN => bytes.extend_from_slice(" \u{2047} ".as_bytes()),
                _ => bytes.extend_from_slice(p.replace(SPACE, " ").as_bytes()),
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if strip_first && self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}

fn parse_byte(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Spm {
        let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut types = vec![UNKNOWN, CONTROL, CONTROL];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        let mut scores = vec![0.0; pieces.len()];
        for (p, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("ab", -3.0),
            ("▁ab", -4.0),
            ("▁a", -9.0),
        ] {
            pieces.push(p.into());
            types.push(NORMAL);
            scores.push(s);
        }
        Spm::new(pieces, scores, types, 0, true)
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let t = toy();
        let id = |p: &str| t.id(p).unwrap();
        // "▁ab": ab (-3) merges before ▁a (-9), then ▁ab.
        assert_eq!(t.encode("ab"), vec![id("▁ab")]);
        // 'c' is no piece: its byte.
        assert_eq!(t.encode("abc"), vec![id("▁ab"), id("<0x63>")]);
        assert_eq!(t.encode("é"), vec![id("▁"), id("<0xC3>"), id("<0xA9>")]);
        // A control token in the text is matched whole; the text after it gets a space again.
        assert_eq!(t.encode("ab</s>ab"), vec![id("▁ab"), 2, id("▁ab")]);
        assert_eq!(t.decode(&t.encode("ab é"), true), "ab é");
        assert_eq!(t.decode(&[1, id("▁ab")], false), " ab");
    }
}
