//! What a sender controls, made fit for the log: how many lines (at most one
//! a second for each kind of refusal) and how long a text it names.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest sender-given text (a tenant segment, say) a line shows, in
/// characters; the rest is replaced by its length.
const SHOWN_CHARS: usize = 64;

/// Lets a line through at most once a second and counts those held back.
#[derive(Default)]
pub(super) struct Throttle(Mutex<ThrottleState>);

#[derive(Default)]
struct ThrottleState {
    logged: Option<Instant>,
    not_logged: u64,
}

impl Throttle {
    /// `Some(those held back since the last line)` when a line may be
    /// written now, else `None` (and this one is counted as held back).
    pub(super) fn admit(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap();
        if (state.logged).is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            state.not_logged += 1;
            return None;
        }
        state.logged = Some(Instant::now());
        Some(std::mem::take(&mut state.not_logged))
    }
}

/// `text` whole when short, else its first [`SHOWN_CHARS`] characters and
/// how long it was.
pub(super) fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_rest_counted() {
        let throttle = Throttle::default();
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        // A second later (set back rather than waited for).
        throttle.0.lock().unwrap().logged = Instant::now().checked_sub(Duration::from_secs(2));
        assert_eq!(throttle.admit(), Some(2));
    }

    #[test]
    fn a_long_text_is_cut_with_its_length() {
        assert_eq!(shown("t-1"), "t-1");
        let exactly = "é".repeat(SHOWN_CHARS);
        assert_eq!(shown(&exactly), exactly);
        let long = "x".repeat(60_000);
        let cut = shown(&long);
        assert_eq!(cut, format!("{}… (60000 bytes)", "x".repeat(SHOWN_CHARS)));
    }
}
