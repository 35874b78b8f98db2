//! Which dead letters a run selects: each filter that is set must match,
//! by the dead letter's `dlq.*` headers; and the replay group that follows
//! from the filters.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;

use chrono::{DateTime, Utc};

use crate::dead_letter::{ErrorClass, Stamp};

fn parse_range(s: &str) -> Result<(i64, i64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not FROM..TO"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("{v:?} is not an offset"))
    };
    Ok((num(a)?, num(b)?))
}

/// Which dead letters to replay: each filter that is set must match, by
/// the dead letter's `dlq.*` headers.
#[derive(Debug, Default, Clone, clap::Args)]
#[command(next_help_heading = "Filters")]
pub struct Filter {
    /// Only this error class (dlq.error_class); repeatable.
    #[arg(long = "error-class", value_name = "CLASS")]
    pub error_classes: Vec<ErrorClass>,
    /// Only dead letters whose reason (dlq.reason) contains this text.
    #[arg(long, value_name = "TEXT")]
    pub reason_contains: Option<String>,
    /// Only this API errcode (dlq.errcode); repeatable.
    #[arg(long = "errcode", value_name = "N")]
    pub errcodes: Vec<i64>,
    /// Only this tenant (dlq.tenant_id); repeatable.
    #[arg(long = "tenant", value_name = "ID")]
    pub tenants: Vec<String>,
    /// Only dead letters that failed at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub failed_after: Option<DateTime<Utc>>,
    /// Only dead letters that failed before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub failed_before: Option<DateTime<Utc>>,
    /// Only records from this input partition (dlq.source_partition); repeatable.
    #[arg(long = "source-partition", value_name = "N")]
    pub source_partitions: Vec<i32>,
    /// Only records from this input offset range, `FROM..TO` (TO excluded).
    #[arg(long, value_name = "FROM..TO", value_parser = parse_range)]
    pub source_offsets: Option<(i64, i64)>,
    /// Only the session ids listed in this file, one per line.
    #[arg(long = "sessions", value_name = "FILE")]
    pub sessions_file: Option<PathBuf>,
    /// The session ids of `--sessions`, once read ([`Filter::read_sessions`]).
    #[arg(skip)]
    pub sessions: Option<HashSet<String>>,
}

impl Filter {
    /// Reads the `--sessions` file, when one is given.
    pub fn read_sessions(&mut self) -> anyhow::Result<()> {
        let Some(path) = &self.sessions_file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --sessions {}", path.display()))?;
        let ids = text.lines().map(str::trim).filter(|l| !l.is_empty());
        self.sessions = Some(ids.map(str::to_string).collect());
        Ok(())
    }

    /// The replay group when `--group` is not given:
    /// `<kafka.group_id>.replay`, plus a digest of the filters when any is
    /// set. A run with other filters then starts from the beginning instead
    /// of after the records an earlier run skipped; the same filters
    /// continue where they stopped.
    pub fn default_group(&self, group_id: &str) -> String {
        let parts = self.described();
        if parts.is_empty() {
            return format!("{group_id}.replay");
        }
        // FNV-1a: stable across builds and platforms.
        let digest = parts
            .join(";")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            });
        format!("{group_id}.replay.{digest:016x}")
    }

    /// The filters that are set, as `name=values` (values sorted).
    fn described(&self) -> Vec<String> {
        fn texts<T: ToString>(values: impl IntoIterator<Item = T>) -> Vec<String> {
            values.into_iter().map(|v| v.to_string()).collect()
        }
        let offsets = self.source_offsets.map(|(a, b)| format!("{a}..{b}"));
        let sessions = self.sessions.iter().flatten();
        [
            ("class", texts(&self.error_classes)),
            ("reason", texts(&self.reason_contains)),
            ("errcode", texts(&self.errcodes)),
            ("tenant", texts(&self.tenants)),
            ("after", texts(self.failed_after.map(|t| t.to_rfc3339()))),
            ("before", texts(self.failed_before.map(|t| t.to_rfc3339()))),
            ("partition", texts(&self.source_partitions)),
            ("offsets", texts(offsets)),
            ("sessions", texts(sessions)),
        ]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, mut values)| {
            values.sort();
            format!("{name}={}", values.join(","))
        })
        .collect()
    }

    /// Whether the dead letter passes every filter that is set.
    pub fn matches(&self, d: &Stamp) -> bool {
        fn any_of<T: PartialEq>(allowed: &[T], v: Option<T>) -> bool {
            allowed.is_empty() || v.is_some_and(|v| allowed.contains(&v))
        }
        let reason = d.reason.as_deref();
        any_of(&self.error_classes, d.error_class)
            && (self.reason_contains.as_ref())
                .is_none_or(|t| reason.is_some_and(|r| r.contains(t.as_str())))
            && any_of(&self.errcodes, d.errcode)
            && any_of(&self.tenants, d.tenant_id.clone())
            && any_of(&self.source_partitions, d.source_partition)
            && (self.failed_after).is_none_or(|t| d.failed_at.is_some_and(|a| a >= t))
            && (self.failed_before).is_none_or(|t| d.failed_at.is_some_and(|a| a < t))
            && (self.source_offsets)
                .is_none_or(|(from, to)| d.source_offset.is_some_and(|o| o >= from && o < to))
            && (self.sessions.as_ref())
                .is_none_or(|set| d.session_id.as_ref().is_some_and(|s| set.contains(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::header as dlq;

    fn failure(pairs: &[(&str, &str)]) -> Stamp {
        Stamp::read(pairs.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
    }

    fn dead() -> Stamp {
        failure(&[
            (dlq::ERROR_CLASS, "retries_exhausted"),
            (dlq::REASON, "errcode 10001: record not ready"),
            (dlq::ERRCODE, "10001"),
            (dlq::TENANT_ID, "t1"),
            (dlq::SESSION_ID, "s1"),
            (dlq::SOURCE_PARTITION, "2"),
            (dlq::SOURCE_OFFSET, "40"),
            (dlq::FAILED_AT, "2026-11-20T10:00:00.000Z"),
        ])
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        assert!(Filter::default().matches(&dead()));
        assert!(Filter::default().matches(&Stamp::default()));
    }

    #[test]
    fn each_filter_selects_on_its_header() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let cases: Vec<(Filter, bool)> = vec![
            (
                Filter {
                    error_classes: vec![ErrorClass::RetriesExhausted],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    error_classes: vec![ErrorClass::InvalidEvent],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    reason_contains: Some("not ready".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    reason_contains: Some("token".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    errcodes: vec![40001, 10001],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    errcodes: vec![40001],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    tenants: vec!["t1".into()],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    tenants: vec!["t2".into()],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    source_partitions: vec![2],
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    source_partitions: vec![0, 1],
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    source_offsets: Some((40, 41)),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    source_offsets: Some((0, 40)),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    failed_after: Some(t("2026-11-20T10:00:00Z")),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    failed_after: Some(t("2026-11-20T10:00:01Z")),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    failed_before: Some(t("2026-11-20T10:00:01Z")),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    failed_before: Some(t("2026-11-20T10:00:00Z")),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    sessions: Some(["s1".to_string()].into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    sessions: Some(["s2".to_string()].into()),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (f, want)) in cases.iter().enumerate() {
            assert_eq!(f.matches(&dead()), *want, "case {i}: {f:?}");
        }
        // A header the filter needs and the dead letter lacks: no match.
        let f = Filter {
            errcodes: vec![10001],
            ..Default::default()
        };
        assert!(!f.matches(&failure(&[(dlq::ERROR_CLASS, "invalid_event")])));
    }

    #[test]
    fn the_default_group_follows_the_filters() {
        let none = Filter::default();
        assert_eq!(none.default_group("g"), "g.replay");
        let a = Filter {
            tenants: vec!["t2".into(), "t1".into()],
            ..Default::default()
        };
        let b = Filter {
            tenants: vec!["t1".into(), "t2".into()],
            ..Default::default()
        };
        let c = Filter {
            tenants: vec!["t1".into()],
            ..Default::default()
        };
        assert!(a.default_group("g").starts_with("g.replay."));
        assert_eq!(
            a.default_group("g"),
            b.default_group("g"),
            "order does not matter"
        );
        assert_ne!(a.default_group("g"), c.default_group("g"));
    }

    #[test]
    fn the_default_group_names_stay_the_same_across_releases() {
        // A rerun must find the group earlier runs committed under.
        let f = Filter {
            tenants: vec!["t2".into(), "t1".into()],
            error_classes: vec![ErrorClass::PermanentError],
            ..Default::default()
        };
        // FNV-1a of "class=permanent_error;tenant=t1,t2".
        assert_eq!(f.default_group("g"), "g.replay.614905054d0cc3f4");
    }

    #[test]
    fn offset_ranges_parse() {
        assert_eq!(parse_range("10..20"), Ok((10, 20)));
        assert!(parse_range("10-20").is_err());
        assert!(parse_range("a..2").is_err());
    }
}
