//! The time range of a backfill: `--from` and `--to` read in the tenant's
//! time zone, and the windows of at most `backfill.window_days` the call
//! list is asked for (the API silently cuts a longer range to 60 days from
//! its start, so no window may rely on that).

use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A point in time as given on the command line, before a zone is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeArg {
    /// With an offset: the same instant in every zone.
    Instant(DateTime<Utc>),
    /// A wall-clock time in the tenant's zone.
    Local(NaiveDateTime),
    /// Midnight today (0) or yesterday (1) in the tenant's zone.
    DaysAgo(u64),
}

impl std::str::FromStr for TimeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "today" => return Ok(TimeArg::DaysAgo(0)),
            "yesterday" => return Ok(TimeArg::DaysAgo(1)),
            _ => {}
        }
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(TimeArg::Instant(t.with_timezone(&Utc)));
        }
        for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S"] {
            if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
                return Ok(TimeArg::Local(t));
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return Ok(TimeArg::Local(d.and_time(NaiveTime::MIN)));
        }
        Err(format!(
            "{s:?} is not a time: use RFC 3339 (2026-11-01T00:00:00+08:00), \
             YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS] (in the tenant's time zone), today or yesterday"
        ))
    }
}

impl TimeArg {
    /// The instant this names in `zone`, `now` being the current time.
    pub fn resolve(&self, zone: Tz, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
        let local = match self {
            TimeArg::Instant(t) => return Ok(*t),
            TimeArg::Local(t) => *t,
            TimeArg::DaysAgo(n) => {
                let today = now.with_timezone(&zone).date_naive();
                (today - Days::new(*n)).and_time(NaiveTime::MIN)
            }
        };
        // A wall-clock time skipped by a daylight-saving change names no
        // instant; one repeated names two: the earlier is taken.
        zone.from_local_datetime(&local)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| format!("{local} does not exist in {zone}"))
    }
}

/// One window asked of the call list: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// `start_time`/`end_time` as the API reads them: wall-clock time in
    /// the tenant's zone, `YYYY-MM-DD HH:MM:SS`.
    pub fn api_times(&self, zone: Tz) -> (String, String) {
        let f = |t: DateTime<Utc>| {
            t.with_timezone(&zone)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        };
        (f(self.start), f(self.end))
    }
}

/// `[from, to)` cut into consecutive windows of at most `days` days.
pub fn windows(from: DateTime<Utc>, to: DateTime<Utc>, days: u32) -> Vec<Window> {
    let step = chrono::Duration::days(i64::from(days.max(1)));
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + step).min(to);
        out.push(Window { start, end });
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn times_are_read_in_the_tenants_zone_unless_they_carry_an_offset() {
        let shanghai: Tz = "Asia/Shanghai".parse().unwrap();
        let now = utc("2026-11-26T03:00:00Z"); // 11:00 in Shanghai
        let at = |s: &str| {
            s.parse::<TimeArg>()
                .unwrap()
                .resolve(shanghai, now)
                .unwrap()
        };
        assert_eq!(at("2026-11-01"), utc("2026-10-31T16:00:00Z"));
        assert_eq!(at("2026-11-01 08:30"), utc("2026-11-01T00:30:00Z"));
        assert_eq!(at("2026-11-01 08:30:15"), utc("2026-11-01T00:30:15Z"));
        assert_eq!(at("2026-11-01T08:30:00Z"), utc("2026-11-01T08:30:00Z"));
        assert_eq!(at("today"), utc("2026-11-25T16:00:00Z"));
        assert_eq!(at("yesterday"), utc("2026-11-24T16:00:00Z"));
        // Just after midnight in Shanghai, still the day before in UTC.
        let early = utc("2026-11-25T16:30:00Z");
        let today = TimeArg::DaysAgo(0).resolve(shanghai, early).unwrap();
        assert_eq!(today, utc("2026-11-25T16:00:00Z"));
        let e = "last week".parse::<TimeArg>().unwrap_err();
        assert!(e.contains("YYYY-MM-DD"), "{e}");
    }

    #[test]
    fn a_wall_clock_time_that_does_not_exist_is_refused() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let skipped = "2026-03-29 02:30".parse::<TimeArg>().unwrap();
        assert!(skipped.resolve(berlin, Utc::now()).is_err());
    }

    #[test]
    fn a_range_is_cut_into_windows_of_at_most_the_given_days() {
        let from = utc("2026-01-01T00:00:00Z");
        let w = windows(from, from + chrono::Duration::days(90), 60);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].start, from);
        assert_eq!(w[0].end, from + chrono::Duration::days(60));
        assert_eq!(w[1].start, w[0].end);
        assert_eq!(w[1].end, from + chrono::Duration::days(90));
        assert_eq!(
            windows(from, from + chrono::Duration::days(60), 60).len(),
            1
        );
        assert!(windows(from, from, 60).is_empty());
        let shanghai: Tz = "Asia/Shanghai".parse().unwrap();
        assert_eq!(
            w[0].api_times(shanghai),
            ("2026-01-01 08:00:00".into(), "2026-03-02 08:00:00".into())
        );
    }
}
