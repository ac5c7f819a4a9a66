//! Picking the next token from the full vocabulary's logits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Whether this sampler always takes the largest logit (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    /// What a step must bring back for this sampler to draw exactly as from the whole
    /// vocabulary: the best candidate (greedy), the top k (top-k sampling, k up to
    /// [`MAX_CANDIDATES`]), or else all logits.
    pub fn want(&self) -> Want {
        let p = &self.params;
        if self.is_greedy() {
            Want::Top {
                n: 1,
                temperature: 0.0,
            }
        } else if p.top_k > 0 && p.top_k <= MAX_CANDIDATES {
            Want::Top {
                n: p.top_k,
                temperature: p.temperature,
            }
        } else {
            Want::Logits
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x))
            .collect();
        self.sample_candidates(&cand)
            .unwrap_or_else(|| argmax(logits))
    }

    /// Draws from `(id, logit)` candidates that hold at least what [`Sampler::want`] asked for:
    /// the same token as [`Sampler::sample`] over the whole vocabulary. None if no candidate
    /// is finite.
    pub fn sample_candidates(&mut self, cands: &[(u32, f32)]) -> Option<u32> {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return cands
                .iter()
                .filter(|c| !c.1.is_nan())
                .min_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)))
                .map(|c| c.0);
        }
        let mut cand: Vec<(u32, f32)> = cands
            .iter()
            .filter(|(_, x)| x.is_finite())
            .map(|&(i, x)| (i, x / p.temperature))
            .collect();
        if cand.is_empty() {
            return None;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && cand.len() > p.top_k {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|(_, x)| ((x - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return Some(cand[i].0);
            }
        }
        Some(cand[probs.len() - 1].0)
    }
}

/// The most candidates a step brings back per sequence instead of its logits.
pub const MAX_CANDIDATES: usize = 256;

/// What a step returns for one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want {
    /// Its logits over the whole vocabulary.
    Logits,
    /// Its `n` best candidates by (logit / temperature, lower id), finite logits only
    /// (temperature 0: by logit).
    Top { n: usize, temperature: f32 },
}

/// The `n` best `(first + i, logits[i])` of `logits` by the key of [`Want::Top`], best first.
pub fn top_candidates(logits: &[f32], n: usize, temperature: f32, first: u32) -> Vec<(u32, f32)> {
    let key = |x: f32| {
        if temperature > 0.0 {
            x / temperature
        } else {
            x
        }
    };
    // Sampling considers finite logits only; greedy decoding any but NaN (as `argmax`).
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| {
            if temperature > 0.0 {
                x.is_finite()
            } else {
                !x.is_nan()
            }
        })
        .map(|(i, &x)| (first + i as u32, x))
        .collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0));
    if c.len() > n {
        c.select_nth_unstable_by(n, cmp);
        c.truncate(n);
    }
    c.sort_by(cmp);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k_and_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params.clone()), "same seed, same tokens");
        let mut top5: Vec<u32> = (0..50).collect();
        top5.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        top5.truncate(5);
        assert!(a.iter().all(|t| top5.contains(t)));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        // A tiny top_p keeps only the most likely token.
        let b = draw(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 1,
        });
        assert!(b.iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn candidates_from_each_slice_draw_what_the_whole_vocabulary_draws() {
        let logits: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 * 0.05).sin() * 4.0)
            .collect();
        for (t, k, p) in [(0.7, 5, 1.0), (1.2, 40, 0.9), (0.0, 0, 1.0), (1.0, 1, 1.0)] {
            for seed in 0..20 {
                let params = SamplingParams {
                    temperature: t,
                    top_k: k,
                    top_p: p,
                    seed,
                };
                let mut whole = Sampler::new(params.clone());
                let mut parts = Sampler::new(params);
                let Want::Top { n, temperature } = parts.want() else {
                    panic!("top-k and greedy ask for candidates")
                };
                // Three shards' slices, each sending its own best n.
                let mut c = Vec::new();
                for (i, slice) in logits.chunks(100).enumerate() {
                    c.extend(top_candidates(slice, n, temperature, (i * 100) as u32));
                }
                assert_eq!(
                    parts.sample_candidates(&c),
                    Some(whole.sample(&logits)),
                    "t {t}, k {k}, seed {seed}"
                );
            }
        }
    }
}
