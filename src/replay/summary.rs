//! What a run did: counted as it goes, printed at the end, and the exit
//! code that follows.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::dead_letter::Stamp;

use super::text_or_dash;

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Dead letters read (up to the captured end offsets).
    pub read: u64,
    pub matched: u64,
    /// Re-submissions acknowledged (enriched or back on the input topic).
    pub replayed: u64,
    pub skipped_by_filter: u64,
    pub skipped_by_loop_guard: u64,
    /// Selected dead letters that hold only the start of the original value
    /// (`dlq.truncated_to`): not replayable, reported with where the
    /// original is.
    pub skipped_truncated: u64,
    /// Re-submissions that failed (with `--direct`: dead-lettered again).
    pub failed: u64,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    /// With `--dry-run`: matches by `error_class: reason`.
    pub by_reason: BTreeMap<String, u64>,
    /// With `--dry-run`: a few matches, as text lines.
    pub sample: Vec<String>,
}

impl Summary {
    pub fn render(&self, dry_run: bool) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: u64| out.push_str(&format!("  {k:<22} {v}\n"));
        line("read", self.read);
        line("matched", self.matched);
        if !dry_run {
            line("replayed", self.replayed);
        }
        line("skipped by filter", self.skipped_by_filter);
        line("skipped by loop guard", self.skipped_by_loop_guard);
        line("skipped, truncated", self.skipped_truncated);
        if !dry_run {
            line("failed", self.failed);
        }
        if dry_run {
            out.push_str("matches by reason:\n");
            for (reason, n) in &self.by_reason {
                out.push_str(&format!("  {n:>8}  {reason}\n"));
            }
            out.push_str("sample:\n");
            for s in &self.sample {
                out.push_str(&format!("  {s}\n"));
            }
        }
        if self.interrupted {
            out.push_str("interrupted: run again to continue\n");
        }
        out
    }

    /// 1 when a re-submission failed or a dead letter could not be
    /// replayed, 130 when interrupted, else 0.
    pub fn exit_code(&self) -> ExitCode {
        if self.failed > 0 || self.skipped_truncated > 0 {
            ExitCode::FAILURE
        } else if self.interrupted {
            ExitCode::from(130)
        } else {
            ExitCode::SUCCESS
        }
    }
}

const SAMPLE: usize = 10;

pub(super) fn note_match(summary: &mut Summary, d: &Stamp, partition: i32, offset: i64) {
    let class = text_or_dash(d.error_class);
    let reason = d.reason.as_deref().unwrap_or("-");
    *summary
        .by_reason
        .entry(format!("{class}: {reason}"))
        .or_default() += 1;
    if summary.sample.len() < SAMPLE {
        summary.sample.push(format!(
            "{}/{} session={} tenant={} {} failed_at={}",
            partition,
            offset,
            d.session_id.as_deref().unwrap_or("-"),
            d.tenant_id.as_deref().unwrap_or("-"),
            class,
            text_or_dash(d.failed_at.map(crate::record::rfc3339)),
        ));
    }
}
