//! Picking the next token from the full vocabulary's logits.

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    /// Report each drawn token's log-probability and this many of the most likely tokens'
    /// (OpenAI's `logprobs`); None: do not.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            logprobs: None,
        }
    }
}

/// A drawn token's log-probability under the model (its logits' softmax, before temperature
/// and cuts, as vLLM reports them) and the most likely tokens' `(id, logprob)`, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The most logprobs a request may ask for per token.
pub const MAX_LOGPROBS: usize = 20;

/// Draws tokens for one request. Every draw is a Gumbel-max over the tokens the parameters
/// keep: the token with the largest `logit / temperature + g`, where `g` is Gumbel noise made
/// from (seed, draw number, token id) by a counter-based hash. The noise of a token does not
/// depend on which shard holds it, so each worker can find its own slice's winner and the
/// coordinator picks the best of those: the same draw as over the whole vocabulary, on any
/// number of workers, without shipping logits (see [`Sampler::want`]).
pub struct Sampler {
    params: SamplingParams,
    draws: u64,
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

fn mix(mut z: u64) -> u64 {
    // splitmix64's finalizer.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Standard Gumbel noise for token `id` of draw `draw` of a request seeded `seed`.
pub fn gumbel(seed: u64, draw: u64, id: u32) -> f64 {
    let h = mix(mix(mix(seed) ^ draw.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ id as u64);
    // A uniform in (0, 1), never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    -(-u.ln()).ln()
}

/// A token's Gumbel-max key.
fn gumbel_key(x: f32, temperature: f32, seed: u64, draw: u64, id: u32) -> f64 {
    (x / temperature) as f64 + gumbel(seed, draw, id)
}

/// The `(id, logit)` with the largest Gumbel-max key (the lower id on a tie).
fn gumbel_winner(
    c: impl IntoIterator<Item = (u32, f32)>,
    t: f32,
    seed: u64,
    draw: u64,
) -> Option<(u32, f32)> {
    c.into_iter()
        .map(|(id, x)| ((id, x), gumbel_key(x, t, seed, draw, id)))
        .min_by(|a, b| b.1.total_cmp(&a.1).then(a.0.0.cmp(&b.0.0)))
        .map(|w| w.0)
}

/// Orders `(id, logit)` best first: the larger logit (logit / t orders alike for t > 0), then
/// the lower id.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// What [`Sampler::sample_candidates`] made of a step's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    Token(u32),
    /// The top-p nucleus reaches past the candidates: draw from the step's logits instead.
    NeedLogits,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler { params, draws: 0 }
    }

    /// Whether this sampler always takes the largest logit (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    /// What a step must bring back for the next draw to be exactly the draw over the whole
    /// vocabulary: the best candidate (greedy); the top k (top-k sampling, k up to
    /// [`MAX_CANDIDATES`]); each slice's Gumbel winner (temperature alone); for a top-p
    /// nucleus without top-k, the top [`NUCLEUS_CANDIDATES`] and each slice's probability
    /// mass, which cover the nucleus unless the distribution is flat (then
    /// [`Draw::NeedLogits`]). Only a top-k above [`MAX_CANDIDATES`] asks for all logits.
    pub fn want(&self) -> Want {
        match self.want_for_draw() {
            Want::Top(mut spec) if self.params.logprobs.is_some() => {
                spec.n = spec.n.max(self.params.logprobs.unwrap_or(0));
                spec.raw_lse = true;
                Want::Top(spec)
            }
            w => w,
        }
    }

    fn want_for_draw(&self) -> Want {
        let p = &self.params;
        let spec = |n: usize, gumbel: bool, mass: bool| {
            Want::Top(TopSpec {
                n,
                temperature: p.temperature,
                gumbel: gumbel.then_some((p.seed, self.draws)),
                mass,
                raw_lse: false,
            })
        };
        if self.is_greedy() {
            Want::Top(TopSpec {
                n: 1,
                temperature: 0.0,
                gumbel: None,
                mass: false,
                raw_lse: false,
            })
        } else if p.top_k > MAX_CANDIDATES {
            Want::Logits
        } else if p.top_k > 0 {
            spec(p.top_k, false, false)
        } else if p.top_p < 1.0 {
            spec(NUCLEUS_CANDIDATES, false, true)
        } else {
            spec(0, true, false)
        }
    }

    /// Draws from the whole vocabulary's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            self.draws += 1;
            return argmax(logits);
        }
        // The same candidates a single worker would send, then, where the nucleus needs more,
        // every logit.
        let spec = match self.want_for_draw() {
            Want::Top(spec) => spec,
            Want::Logits => TopSpec {
                n: self.params.top_k,
                temperature: self.params.temperature,
                gumbel: None,
                mass: false,
                raw_lse: false,
            },
        };
        if let Draw::Token(t) = self.sample_candidates(&candidates(logits, &spec, 0)) {
            return t;
        }
        let all = TopSpec {
            n: logits.len(),
            ..spec
        };
        match self.sample_candidates(&candidates(logits, &all, 0)) {
            Draw::Token(t) => t,
            Draw::NeedLogits => unreachable!("every logit is a candidate"),
        }
    }

    /// Draws from what the shards sent for [`Sampler::want`] (merged with
    /// [`Candidates::merge`]): the same token as [`Sampler::sample`] over the whole vocabulary.
    pub fn sample_candidates(&mut self, c: &Candidates) -> Draw {
        let p = self.params.clone();
        let draw = self.draws;
        if self.is_greedy() {
            self.draws += 1;
            return Draw::Token(
                c.top
                    .iter()
                    .filter(|c| !c.1.is_nan())
                    .min_by(|a, b| best_first(a, b))
                    .map_or(0, |c| c.0),
            );
        }
        let t = p.temperature;
        let mut cand: Vec<(u32, f32)> = c.top.iter().copied().filter(|c| c.1.is_finite()).collect();
        if cand.is_empty() {
            self.draws += 1;
            return Draw::Token(0);
        }
        cand.sort_by(best_first);
        cand.dedup_by_key(|c| c.0);
        let keep = if p.top_k > 0 {
            cand.truncate(p.top_k);
            if p.top_p < 1.0 {
                // The nucleus of the top k, renormalized among them.
                let lse = log_sum_exp(cand.iter().map(|x| x.1), t);
                nucleus(&cand, t, lse, p.top_p, f32::NEG_INFINITY).unwrap_or(cand.len())
            } else {
                cand.len()
            }
        } else if p.top_p < 1.0 {
            // Only tokens above every slice's floor are surely all here.
            match nucleus(&cand, t, c.lse, p.top_p, c.floor) {
                Some(k) => k,
                None => return Draw::NeedLogits,
            }
        } else {
            cand.len()
        };
        self.draws += 1;
        let best = gumbel_winner(cand[..keep].iter().copied(), t, p.seed, draw)
            .expect("at least one kept");
        Draw::Token(best.0)
    }
}

impl Sampler {
    /// `tok`'s logprobs from the candidates of the step that drew it (asked for by
    /// [`Sampler::want`]); None where the request did not ask.
    pub fn logprobs(&self, c: &Candidates, tok: u32) -> Option<TokenLogprobs> {
        let k = self.params.logprobs?;
        let mut top: Vec<(u32, f32)> = c.top.iter().copied().filter(|x| !x.1.is_nan()).collect();
        top.sort_by(best_first);
        top.dedup_by_key(|x| x.0);
        let lp = |x: f32| (x as f64 - c.lse_raw) as f32;
        let logprob = top
            .iter()
            .find(|x| x.0 == tok)
            .map_or(f32::NEG_INFINITY, |x| lp(x.1));
        top.truncate(k);
        Some(TokenLogprobs {
            logprob,
            top: top.into_iter().map(|(id, x)| (id, lp(x))).collect(),
        })
    }

    /// Draws from the whole vocabulary's logits, with the drawn token's logprobs where asked.
    pub fn sample_with_logprobs(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprobs>) {
        let t = self.sample(logits);
        (t, self.logprobs_from_logits(logits, t))
    }

    /// The same from the step's whole logits.
    pub fn logprobs_from_logits(&self, logits: &[f32], tok: u32) -> Option<TokenLogprobs> {
        let k = self.params.logprobs?;
        let spec = TopSpec {
            n: k.max(1),
            temperature: 0.0,
            gumbel: None,
            mass: false,
            raw_lse: true,
        };
        let mut c = candidates(logits, &spec, 0);
        if let Some(&x) = logits.get(tok as usize) {
            c.top.push((tok, x));
        }
        self.logprobs(&c, tok)
    }
}

/// How many of `sorted` (best first) the top-p nucleus keeps: the shortest prefix whose
/// probability (`exp(logit / t - lse)`) reaches `top_p`. None when the prefix of logits above
/// `floor` (the part known to be complete) does not reach it.
fn nucleus(sorted: &[(u32, f32)], t: f32, lse: f64, top_p: f32, floor: f32) -> Option<usize> {
    let mut acc = 0f64;
    for (i, &(_, x)) in sorted.iter().enumerate() {
        if x <= floor {
            return None;
        }
        acc += ((x / t) as f64 - lse).exp();
        if acc >= top_p as f64 {
            return Some(i + 1);
        }
    }
    // Every token is here (floor is -inf) and rounding kept the sum under top_p: all of them.
    (floor == f32::NEG_INFINITY).then_some(sorted.len())
}

/// The most candidates a step brings back per sequence instead of its logits.
pub const MAX_CANDIDATES: usize = 256;

/// Candidates per slice for a top-p nucleus without top-k.
pub const NUCLEUS_CANDIDATES: usize = 256;

/// What a step returns for one sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want {
    /// Its logits over the whole vocabulary.
    Logits,
    /// Candidates from each vocabulary slice, merged.
    Top(TopSpec),
}

/// Which candidates a slice sends (see [`candidates`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopSpec {
    /// Its best `n` by (logit / temperature, lower id) among finite logits (temperature 0: by
    /// logit, any but NaN).
    pub n: usize,
    pub temperature: f32,
    /// With (seed, draw): also its token with the largest Gumbel-max key.
    pub gumbel: Option<(u64, u64)>,
    /// Also its log-sum-exp of logit / temperature, and the largest logit it left out.
    pub mass: bool,
    /// Also its log-sum-exp of the logits themselves (for logprobs).
    pub raw_lse: bool,
}

impl TopSpec {
    /// Asks for the best logit and nothing else (greedy decoding): a device can pick it.
    pub fn greedy_only(&self) -> bool {
        self.n == 1
            && self.temperature <= 0.0
            && self.gumbel.is_none()
            && !self.mass
            && !self.raw_lse
    }
}

/// A sequence's candidates from one slice or, merged, from all.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// `(id, logit)`; at most n + 1 per slice (the Gumbel winner may come on top).
    pub top: Vec<(u32, f32)>,
    /// log Σ exp(logit / temperature) over the finite logits (-inf when not asked).
    pub lse: f64,
    /// The largest logit left out of `top` (-inf when nothing finite was, or not asked):
    /// every token above it is in `top`.
    pub floor: f32,
    /// log Σ exp(logit) over the finite logits (-inf when not asked).
    pub lse_raw: f64,
}

impl Candidates {
    pub fn empty() -> Candidates {
        Candidates {
            top: Vec::new(),
            lse: f64::NEG_INFINITY,
            floor: f32::NEG_INFINITY,
            lse_raw: f64::NEG_INFINITY,
        }
    }

    /// Adds another slice's candidates.
    pub fn merge(&mut self, other: &Candidates) {
        self.top.extend_from_slice(&other.top);
        self.lse = log_add_exp(self.lse, other.lse);
        self.floor = self.floor.max(other.floor);
        self.lse_raw = log_add_exp(self.lse_raw, other.lse_raw);
    }
}

/// log Σ exp(x / t) over finite `xs` (-inf for none).
fn log_sum_exp(xs: impl Iterator<Item = f32> + Clone, t: f32) -> f64 {
    let max = xs.clone().map(|x| x / t).fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.map(|x| ((x / t) as f64 - max).exp()).sum::<f64>().ln()
}

fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// A slice's candidates for `spec`; `logits[i]` is token `first + i`. One pass over the
/// slice, keeping at most `2 n` candidates at a time (a greedy step of a 128k-token slice must
/// not build and partition a vector of all of them).
pub fn candidates(logits: &[f32], spec: &TopSpec, first: u32) -> Candidates {
    let t = spec.temperature;
    // Sampling considers finite logits only; greedy decoding any but NaN (as `argmax`).
    let keep = move |x: f32| if t > 0.0 { x.is_finite() } else { !x.is_nan() };
    let all = || {
        logits
            .iter()
            .enumerate()
            .filter(move |(_, x)| keep(**x))
            .map(move |(i, &x)| (first + i as u32, x))
    };
    let mut out = Candidates::empty();
    if spec.mass && t > 0.0 {
        out.lse = log_sum_exp(all().map(|x| x.1), t);
    }
    if spec.raw_lse {
        out.lse_raw = log_sum_exp(logits.iter().copied().filter(|x| x.is_finite()), 1.0);
    }
    let winner = spec
        .gumbel
        .filter(|_| t > 0.0)
        .and_then(|(seed, draw)| gumbel_winner(all(), t, seed, draw));
    let n = spec.n;
    // The best n so far (unordered) and, once n are held, the worst of them: a later token
    // enters only if it is better. `floor`: the largest logit left out.
    let mut c: Vec<(u32, f32)> = Vec::with_capacity(2 * n);
    let mut floor = f32::NEG_INFINITY;
    let cut = |c: &mut Vec<(u32, f32)>, floor: &mut f32| {
        if c.len() > n {
            if n > 0 {
                c.select_nth_unstable_by(n - 1, best_first);
            }
            *floor = c[n..].iter().map(|x| x.1).fold(*floor, f32::max);
            c.truncate(n);
        }
    };
    if n == 0 {
        floor = all().map(|x| x.1).fold(floor, f32::max);
    } else {
        let mut worst: Option<(u32, f32)> = None;
        // By blocks: a block whose largest logit is below the worst held is passed over
        // whole (a comparison the compiler vectorizes), which is nearly every block.
        const BLOCK: usize = 64;
        for (bi, block) in logits.chunks(BLOCK).enumerate() {
            if let Some(w) = worst {
                // NaNs never win `>`: they are passed over, as the filter would.
                let m = block
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                if m < w.1 {
                    floor = floor.max(m);
                    continue;
                }
            }
            for (j, &v) in block.iter().enumerate() {
                if !keep(v) {
                    continue;
                }
                let x = (first + (bi * BLOCK + j) as u32, v);
                if worst.is_some_and(|w| best_first(&x, &w) != std::cmp::Ordering::Less) {
                    floor = floor.max(x.1);
                    continue;
                }
                c.push(x);
                if c.len() == 2 * n {
                    cut(&mut c, &mut floor);
                    worst = c.last().copied();
                }
            }
        }
    }
    cut(&mut c, &mut floor);
    if spec.mass {
        out.floor = floor;
    }
    c.sort_by(best_first);
    if let Some(w) = winner
        && !c.iter().any(|x| x.0 == w.0)
    {
        c.push(w);
    }
    out.top = c;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            logprobs: None,
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn gumbel_max_draws_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, 3.0, f32::NEG_INFINITY];
        for t in [1.0f32, 0.5] {
            let mut s = Sampler::new(params(t, 0, 1.0, 42));
            let n = 40_000;
            let mut counts = [0usize; 5];
            for _ in 0..n {
                counts[s.sample(&logits) as usize] += 1;
            }
            let z: f64 = logits[..4].iter().map(|&x| ((x / t) as f64).exp()).sum();
            for i in 0..4 {
                let want = ((logits[i] / t) as f64).exp() / z;
                let got = counts[i] as f64 / n as f64;
                assert!(
                    (got - want).abs() < 0.01,
                    "t {t} token {i}: {got} vs {want}"
                );
            }
            assert_eq!(counts[4], 0, "a -inf logit is never drawn");
        }
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k_and_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(params(1.0, 5, 1.0, 7));
        assert_eq!(a, draw(params(1.0, 5, 1.0, 7)), "same seed, same tokens");
        assert_ne!(
            a,
            draw(params(1.0, 5, 1.0, 8)),
            "another seed, other tokens"
        );
        let mut top5: Vec<u32> = (0..50).collect();
        top5.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        top5.truncate(5);
        assert!(a.iter().all(|t| top5.contains(t)));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        // A tiny top_p keeps only the most likely token, with or without top-k.
        for k in [0, 10] {
            let b = draw(params(1.0, k, 1e-6, 1));
            assert!(b.iter().all(|&t| t == argmax(&logits)));
        }
    }

    /// What the scheduler does: each slice's candidates merged, and the full logits where the
    /// draw asks for them.
    fn draw_from_slices(s: &mut Sampler, logits: &[f32], cuts: &[usize]) -> (u32, bool) {
        let Want::Top(spec) = s.want() else {
            return (s.sample(logits), true);
        };
        let mut merged = Candidates::empty();
        let mut start = 0;
        for &end in cuts.iter().chain([logits.len()].iter()) {
            merged.merge(&candidates(&logits[start..end], &spec, start as u32));
            start = end;
        }
        match s.sample_candidates(&merged) {
            Draw::Token(t) => (t, false),
            Draw::NeedLogits => (s.sample(logits), true),
        }
    }

    #[test]
    fn candidates_from_each_slice_draw_what_the_whole_vocabulary_draws() {
        let logits: Vec<f32> = (0..3000)
            .map(|i| ((i * 37 % 1001) as f32 * 0.05).sin() * 6.0 - (i % 7) as f32)
            .collect();
        let cases = [
            (0.7, 5, 1.0),
            (1.2, 40, 0.9),
            (0.0, 0, 1.0),
            (1.0, 1, 1.0),
            (0.8, 0, 1.0),
            (1.0, 0, 0.5),
            (0.6, 0, 0.95),
            (1.0, 300, 1.0),
        ];
        for (t, k, p) in cases {
            for cuts in [&[][..], &[1500], &[700, 2000], &[1, 1000, 2999]] {
                for seed in 0..5 {
                    let mut whole = Sampler::new(params(t, k, p, seed));
                    let mut parts = Sampler::new(params(t, k, p, seed));
                    for step in 0..10 {
                        let want = whole.sample(&logits);
                        let (got, _) = draw_from_slices(&mut parts, &logits, cuts);
                        assert_eq!(
                            got, want,
                            "t {t} k {k} p {p} cuts {cuts:?} seed {seed} step {step}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_nucleus_wider_than_the_candidates_falls_back_to_the_logits() {
        // Nearly flat: 0.9 of the mass needs about 2700 of 3000 tokens, far more than the
        // 64 per slice that come back.
        let logits: Vec<f32> = (0..3000).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut fell_back = 0;
        for seed in 0..20 {
            let mut whole = Sampler::new(params(1.0, 0, 0.9, seed));
            let mut parts = Sampler::new(params(1.0, 0, 0.9, seed));
            for _ in 0..5 {
                let want = whole.sample(&logits);
                let (got, full) = draw_from_slices(&mut parts, &logits, &[1000, 2000]);
                assert_eq!(got, want);
                fell_back += full as usize;
            }
        }
        assert_eq!(fell_back, 100, "every draw needed the logits");
        // A peaked distribution's nucleus is within the candidates: no fallback.
        let peaked: Vec<f32> = (0..3000)
            .map(|i| if i % 500 == 3 { 20.0 } else { 0.0 })
            .collect();
        let mut s = Sampler::new(params(1.0, 0, 0.9, 3));
        let (_, full) = draw_from_slices(&mut s, &peaked, &[1000, 2000]);
        assert!(!full);
    }

    #[test]
    fn candidates_say_what_they_left_out() {
        let logits = [1.0f32, 5.0, f32::NEG_INFINITY, 3.0, 4.0, 2.0];
        let spec = TopSpec {
            n: 2,
            temperature: 1.0,
            gumbel: None,
            mass: true,
            raw_lse: true,
        };
        let c = candidates(&logits, &spec, 10);
        assert_eq!(c.top, vec![(11, 5.0), (14, 4.0)]);
        assert_eq!(c.floor, 3.0);
        let z: f64 = [1.0f64, 5.0, 3.0, 4.0, 2.0].iter().map(|x| x.exp()).sum();
        assert!((c.lse - z.ln()).abs() < 1e-9);
        assert!((c.lse_raw - z.ln()).abs() < 1e-9);
    }

    /// The one-pass selection against sorting everything: the same candidates in the same
    /// order and the same largest left-out logit, with ties, infinities and NaNs, for greedy
    /// and sampling and every n from 0 to past the slice's length.
    #[test]
    fn one_pass_candidates_equal_a_full_sort() {
        let mut z = 7u64;
        for case in 0..400 {
            let len = 1 + (mix(case) % 300) as usize;
            let logits: Vec<f32> = (0..len)
                .map(|_| {
                    z = mix(z);
                    match z % 23 {
                        0 => f32::NEG_INFINITY,
                        1 => f32::INFINITY,
                        2 => f32::NAN,
                        // Few distinct values: many ties.
                        r => ((r % 7) as f32) * 0.5 - 1.0,
                    }
                })
                .collect();
            for &t in &[0.0f32, 0.8] {
                for n in [0, 1, 2, 3, 5, 64, len - 1, len, len + 3] {
                    let spec = TopSpec {
                        n,
                        temperature: t,
                        gumbel: None,
                        mass: true,
                        raw_lse: false,
                    };
                    let got = candidates(&logits, &spec, 100);
                    let mut all: Vec<(u32, f32)> = logits
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| if t > 0.0 { x.is_finite() } else { !x.is_nan() })
                        .map(|(i, &x)| (100 + i as u32, x))
                        .collect();
                    all.sort_by(best_first);
                    let floor = all
                        .get(n..)
                        .unwrap_or(&[])
                        .iter()
                        .map(|x| x.1)
                        .fold(f32::NEG_INFINITY, f32::max);
                    all.truncate(n);
                    let bits = |v: &[(u32, f32)]| -> Vec<(u32, u32)> {
                        v.iter().map(|x| (x.0, x.1.to_bits())).collect()
                    };
                    assert_eq!(bits(&got.top), bits(&all), "case {case}, t {t}, n {n}");
                    assert_eq!(got.floor.to_bits(), floor.to_bits(), "case {case}, n {n}");
                }
            }
        }
    }

    #[test]
    fn logprobs_from_slices_equal_the_log_softmax() {
        let logits: Vec<f32> = (0..500)
            .map(|i| ((i * 13 % 97) as f32 * 0.11).cos() * 5.0)
            .collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for (t, k) in [(0.0, 0), (0.9, 0), (0.7, 3)] {
            let mut p = params(t, k, 1.0, 9);
            p.logprobs = Some(5);
            let mut s = Sampler::new(p);
            let Want::Top(spec) = s.want() else {
                panic!("candidates")
            };
            assert!(spec.n >= 5 && spec.raw_lse);
            let mut merged = Candidates::empty();
            for (i, part) in logits.chunks(170).enumerate() {
                merged.merge(&candidates(part, &spec, (i * 170) as u32));
            }
            let Draw::Token(tok) = s.sample_candidates(&merged) else {
                panic!("drawn")
            };
            let lp = s.logprobs(&merged, tok).unwrap();
            assert!((lp.logprob as f64 - (logits[tok as usize] as f64 - z)).abs() < 1e-5);
            let mut order: Vec<usize> = (0..500).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            assert_eq!(lp.top.len(), 5);
            for (j, &(id, v)) in lp.top.iter().enumerate() {
                assert_eq!(id as usize, order[j]);
                assert!((v as f64 - (logits[order[j]] as f64 - z)).abs() < 1e-5);
            }
            let whole = s.logprobs_from_logits(&logits, tok).unwrap();
            assert!((whole.logprob - lp.logprob).abs() < 1e-5);
            assert_eq!(
                whole.top.iter().map(|x| x.0).collect::<Vec<_>>(),
                lp.top.iter().map(|x| x.0).collect::<Vec<_>>()
            );
        }
    }
}
