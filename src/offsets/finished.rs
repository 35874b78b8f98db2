//! Which records beyond a partition's committed offset are finished
//! already, carried in the commit's metadata string. The committed offset
//! never passes an unfinished record; the metadata adds what finished after
//! it, so that the partition's next owner (after a crash or a rebalance)
//! skips those records instead of writing them a second time.
//!
//! Form: `ue1:` then, in URL-safe base64 without padding, LEB128 pairs
//! (gap, length), one per run of finished offsets; each gap counts from the
//! end of the run before (from the committed offset for the first). A list
//! longer than its limit keeps its first runs: the records left out are
//! delivered again, as they would be without metadata.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const PREFIX: &str = "ue1:";

/// Finished offsets as sorted, disjoint, non-adjacent runs `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    runs: Vec<(i64, i64)>,
}

/// Metadata that is not this form (another tool's, or damaged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("commit metadata is not a list of finished offsets ({0})")]
pub struct Unreadable(&'static str);

impl Finished {
    /// From runs in ascending order; empty runs are dropped and touching
    /// ones joined.
    pub fn from_runs(runs: impl IntoIterator<Item = (i64, i64)>) -> Finished {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for (start, end) in runs.into_iter().filter(|(s, e)| s < e) {
            match out.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => out.push((start, end)),
            }
        }
        Finished { runs: out }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn contains(&self, offset: i64) -> bool {
        let i = self.runs.partition_point(|&(_, end)| end <= offset);
        self.runs.get(i).is_some_and(|&(start, _)| start <= offset)
    }

    /// The runs from `from` on (a run across `from` is cut there).
    pub fn runs_from(&self, from: i64) -> impl Iterator<Item = (i64, i64)> + '_ {
        (self.runs.iter())
            .filter(move |&&(_, end)| end > from)
            .map(move |&(start, end)| (start.max(from), end))
    }

    /// How many offsets the runs cover.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(s, e)| (e - s) as u64).sum()
    }

    /// The metadata for a commit at `base`: runs below it are dropped, and
    /// the text is at most `max_bytes` long (empty when nothing fits).
    pub fn encode(&self, base: i64, max_bytes: usize) -> String {
        let mut bytes = Vec::new();
        let mut kept = 0;
        let mut cursor = base;
        for (start, end) in self.runs_from(base) {
            let before = bytes.len();
            leb128(&mut bytes, (start - cursor) as u64);
            leb128(&mut bytes, (end - start) as u64);
            if PREFIX.len() + base64_len(bytes.len()) > max_bytes {
                bytes.truncate(before);
                break;
            }
            kept = bytes.len();
            cursor = end;
        }
        if kept == 0 {
            return String::new();
        }
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes[..kept]))
    }

    /// Reads metadata committed at `base`; empty metadata is no runs.
    pub fn decode(base: i64, text: &str) -> Result<Finished, Unreadable> {
        if text.is_empty() {
            return Ok(Finished::default());
        }
        let body = text
            .strip_prefix(PREFIX)
            .ok_or(Unreadable("unknown form"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| Unreadable("not base64"))?;
        let mut numbers = Numbers(&bytes);
        let mut runs = Vec::new();
        let mut cursor = base;
        while let Some(gap) = numbers.next().transpose()? {
            let len = numbers.next().transpose()?.ok_or(Unreadable("odd count"))?;
            let start = offset_after(cursor, gap)?;
            let end = offset_after(start, len)?;
            if len == 0 {
                return Err(Unreadable("empty run"));
            }
            runs.push((start, end));
            cursor = end;
        }
        Ok(Finished { runs })
    }
}

fn offset_after(at: i64, n: u64) -> Result<i64, Unreadable> {
    i64::try_from(n)
        .ok()
        .and_then(|n| at.checked_add(n))
        .ok_or(Unreadable("offset out of range"))
}

fn base64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

fn leb128(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// LEB128 numbers read one by one.
struct Numbers<'a>(&'a [u8]);

impl Iterator for Numbers<'_> {
    type Item = Result<u64, Unreadable>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let mut n = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            n |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(Ok(n));
            }
        }
        self.0 = &[];
        Some(Err(Unreadable("truncated number")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_relative_to_the_committed_offset() {
        let f = Finished::from_runs([(101, 103), (104, 200), (1_000, 1_001)]);
        let text = f.encode(100, 4096);
        assert!(text.starts_with("ue1:"), "{text}");
        assert_eq!(Finished::decode(100, &text), Ok(f.clone()));
        assert!(f.contains(101) && f.contains(199) && f.contains(1_000));
        assert!(!f.contains(100) && !f.contains(103) && !f.contains(200));
        assert_eq!(f.len(), 2 + 96 + 1);
    }

    #[test]
    fn nothing_finished_is_empty_metadata() {
        assert_eq!(Finished::default().encode(5, 4096), "");
        assert_eq!(Finished::decode(5, ""), Ok(Finished::default()));
        // Runs below the committed offset are not said again.
        assert_eq!(Finished::from_runs([(1, 4)]).encode(5, 4096), "");
    }

    #[test]
    fn a_run_across_the_committed_offset_is_cut_there() {
        let f = Finished::from_runs([(1, 10)]);
        let text = f.encode(5, 4096);
        assert_eq!(
            Finished::decode(5, &text),
            Ok(Finished::from_runs([(5, 10)]))
        );
    }

    #[test]
    fn too_many_runs_keep_the_first_within_the_limit() {
        // Every other offset finished: 2 000 runs, far over 200 bytes.
        let f = Finished::from_runs((0..2_000).map(|i| (2 * i + 1, 2 * i + 2)));
        let text = f.encode(0, 200);
        assert!(text.len() <= 200, "{}", text.len());
        let kept = Finished::decode(0, &text).unwrap();
        assert!(!kept.is_empty());
        // A prefix of the runs, nothing invented.
        let all: Vec<_> = f.runs_from(0).collect();
        let some: Vec<_> = kept.runs_from(0).collect();
        assert_eq!(all[..some.len()], some[..]);
        assert_eq!(f.encode(0, 5), "", "no run fits");
    }

    #[test]
    fn large_offsets_and_gaps_survive() {
        let base = 9_000_000_000_000;
        let f = Finished::from_runs([(base + 1, base + 2), (base + 5_000_000, base + 9_000_000)]);
        assert_eq!(Finished::decode(base, &f.encode(base, 4096)), Ok(f));
    }

    #[test]
    fn foreign_or_damaged_metadata_is_refused() {
        for text in ["hello", "ue1:@@@", "ue1:gA", "ue1:AQ", "ue1:AQA"] {
            assert!(Finished::decode(0, text).is_err(), "{text}");
        }
    }

    #[test]
    fn touching_runs_join() {
        let f = Finished::from_runs([(1, 3), (3, 5), (5, 5), (7, 8)]);
        assert_eq!(f.runs_from(0).collect::<Vec<_>>(), [(1, 5), (7, 8)]);
    }
}
