//! Stop sequences (OpenAI's `stop`): the answer ends where one of them first appears in the
//! decoded text, which is not shown. A stop string may span several tokens, so text that could
//! still become one is held back until it cannot.

use crate::error::{Error, Result};

/// Most stop sequences a request may give, and the longest one in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;

/// Streamed text filtered through the stop sequences.
#[derive(Debug, Clone, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Decoded, not yet shown (it may be the start of a stop sequence).
    held: String,
    stopped: bool,
}

impl StopText {
    /// Checks the sequences (non-empty, at most `MAX_STOPS` of at most `MAX_STOP_BYTES`).
    pub fn new(stops: Vec<String>) -> Result<Self> {
        if stops.len() > MAX_STOPS {
            return Err(Error::input(format!(
                "stop: {} sequences, at most {MAX_STOPS}",
                stops.len()
            )));
        }
        if let Some(i) = stops.iter().position(|s| s.is_empty()) {
            return Err(Error::input(format!("stop[{i}] is empty")));
        }
        if let Some(i) = stops.iter().position(|s| s.len() > MAX_STOP_BYTES) {
            return Err(Error::input(format!(
                "stop[{i}] is {} bytes long, at most {MAX_STOP_BYTES}",
                stops[i].len()
            )));
        }
        Ok(StopText {
            stops,
            ..Default::default()
        })
    }

    /// Whether a stop sequence has appeared (the answer should end).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next decoded piece; returns the text that can be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        if let Some(at) = self.first_stop() {
            self.stopped = true;
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        let keep = self.partial_suffix();
        let show = self.held.len() - keep;
        let rest = self.held.split_off(show);
        std::mem::replace(&mut self.held, rest)
    }

    /// The text still held when the answer ends for another reason (it was no stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte offset of the earliest complete stop sequence in the held text.
    fn first_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s)).min()
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop
    /// sequence (on a char boundary).
    fn partial_suffix(&self) -> usize {
        let h = &self.held;
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(h.len() + 1))
                    .filter(|&n| s.is_char_boundary(n) && h.ends_with(&s[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Vec<String>, bool) {
        let mut t = StopText::new(stops.iter().map(|s| s.to_string()).collect()).unwrap();
        let shown: Vec<String> = pieces.iter().map(|p| t.push(p)).collect();
        let stopped = t.stopped();
        let mut all: String = shown.concat();
        all += &t.finish();
        (all, shown, stopped)
    }

    #[test]
    fn a_stop_spanning_pieces_is_cut_and_not_shown() {
        let (all, shown, stopped) = run(&["\nUser:"], &["Hello", " there\n", "Us", "er: more"]);
        assert!(stopped);
        assert_eq!(all, "Hello there");
        assert_eq!(
            shown[1], " there",
            "the newline is held: it may start the stop"
        );
        assert_eq!(shown[2], "");
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_shown() {
        let (all, shown, stopped) = run(&["STOP"], &["a ST", "ar", " ST"]);
        assert!(!stopped);
        assert_eq!(shown, ["a ", "STar", " "]);
        assert_eq!(all, "a STar ST");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let (all, _, stopped) = run(&["é!", "b"], &["aé", "!b"]);
        assert!(stopped);
        assert_eq!(all, "a");
        let (all, _, stopped) = run(&["日本"], &["x日", "y"]);
        assert!(!stopped);
        assert_eq!(all, "x日y");
    }

    #[test]
    fn bad_stop_lists_are_rejected() {
        assert!(StopText::new(vec![String::new()]).is_err());
        assert!(StopText::new(vec!["x".into(); MAX_STOPS + 1]).is_err());
        assert!(StopText::new(vec!["x".repeat(MAX_STOP_BYTES + 1)]).is_err());
    }
}
