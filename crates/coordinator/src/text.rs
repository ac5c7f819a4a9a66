//! Turning a request's token ids into the text its client sees: whole characters only, no
//! text for the end token that stopped generation, and cut exactly before the first stop
//! string, even when one spans several tokens.

use tessera_model::{TextStream, Tokenizer};

pub struct StopText {
    stream: TextStream,
    stops: Vec<String>,
    /// Tokens that end generation: they are not answer text.
    end_ids: Vec<u32>,
    /// Decoded text not yet sent: it might be the beginning of a stop string.
    pending: String,
    /// Set once a stop string was found; nothing more is sent.
    pub stopped: bool,
}

impl StopText {
    /// `end_ids`: the tokens that stop generation (none when it ignores them).
    pub fn new(stops: Vec<String>, end_ids: Vec<u32>) -> StopText {
        StopText {
            stream: TextStream::default(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            end_ids,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds a token; returns the text that can be sent now.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.stopped || self.end_ids.contains(&id) {
            return String::new();
        }
        let piece = self.stream.push(tok, id).unwrap_or_default();
        self.feed(&piece)
    }

    /// Adds decoded text; returns what can be sent now.
    pub fn feed(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.pending[..cut].to_string();
            self.pending.clear();
            return out;
        }
        // Hold back the longest tail that a stop string starts with.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let send = self.pending.len() - keep;
        let out = self.pending[..send].to_string();
        self.pending.drain(..send);
        out
    }

    /// At the end of generation: whatever is still held back.
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = self.stream.finish(tok).unwrap_or_default();
        let out = self.feed(&tail);
        if self.stopped {
            return out;
        }
        out + &std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_before_a_stop_string_split_over_pieces() {
        let mut s = StopText::new(vec!["\n\n".into(), "END".into()], vec![]);
        assert_eq!(s.feed("Paris."), "Paris.");
        assert_eq!(s.feed("\n"), "");
        assert_eq!(s.feed("\nThe"), "");
        assert!(s.stopped);
        assert_eq!(s.feed("more"), "");
    }

    #[test]
    fn releases_a_held_back_prefix_that_does_not_complete() {
        let mut s = StopText::new(vec!["END".into()], vec![]);
        assert_eq!(s.feed("the E"), "the ");
        assert_eq!(s.feed("N"), "");
        assert_eq!(s.feed("D"), "");
        assert!(s.stopped);
        let mut s = StopText::new(vec!["END".into()], vec![]);
        assert_eq!(s.feed("the EN"), "the ");
        assert_eq!(s.feed("ough"), "ENough");
        assert!(!s.stopped);
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_kept_whole() {
        let mut s = StopText::new(vec!["b".into(), "é!".into()], vec![]);
        assert_eq!(s.feed("aé"), "a");
        assert_eq!(s.feed("!b"), "");
        assert!(s.stopped);
    }

    #[test]
    fn the_end_token_is_not_text() {
        // The fixtures beside the checkout (or TESSERA_FIXTURES), as the end-to-end tests use.
        let fixtures = std::env::var_os("TESSERA_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../../shared/fixtures")
            });
        let tok = tessera_model::Tokenizer::from_file(
            &fixtures.join("tiny-llama/tokenizer.json"),
            vec![1],
        )
        .unwrap();
        let ids = tok.encode("hello world").unwrap();
        let mut s = StopText::new(vec![], vec![1]);
        let mut text: String = ids.iter().map(|&id| s.push(&tok, id)).collect();
        text += &s.push(&tok, 1);
        text += &s.finish(&tok);
        assert_eq!(text, tok.decode(&ids).unwrap());
        // Ignored end tokens (an empty list) are text like any other.
        let mut s = StopText::new(vec![], vec![]);
        let mut all = ids.clone();
        all.push(1);
        let text: String =
            all.iter().map(|&id| s.push(&tok, id)).collect::<String>() + &s.finish(&tok);
        assert_eq!(text, tok.decode(&all).unwrap());
    }
}
