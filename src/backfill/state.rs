//! A backfill's progress on disk, so that a run stopped by Ctrl-C, a kill
//! or a crash continues where it was: per tenant, the window and page to
//! ask for next. It is written (to a temporary file, then renamed) after
//! every page whose events the broker acknowledged, so a rerun submits at
//! most one page again. A file of another run (other tenants, range or
//! page size) is replaced: its run is not this one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where one tenant is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Index of the window to ask next.
    pub window: usize,
    /// The page of that window to ask next (1-based).
    pub page: u32,
    /// Every window listed.
    pub done: bool,
}

impl Position {
    pub fn start() -> Position {
        Position {
            window: 0,
            page: 1,
            done: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    /// What run this is: tenants, resolved range, window and page sizes.
    run: String,
    /// The end of the range of a run without `--to` ("now" when it
    /// started), which its rerun keeps.
    #[serde(default)]
    open_end: Option<DateTime<Utc>>,
    tenants: BTreeMap<String, Position>,
}

/// The end a run without `--to` kept in the file at `path`, if any.
pub fn saved_open_end(path: &Path) -> Option<DateTime<Utc>> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice::<Saved>(&bytes).ok()?.open_end
}

/// Whether the file at `path` holds the progress of `run`.
pub fn holds(path: &Path, run: &str) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
        .is_some_and(|s| s.run == run)
}

/// The progress of this run; writes nothing when it has no path (a dry
/// run).
#[derive(Debug)]
pub struct State {
    path: Option<PathBuf>,
    saved: Saved,
}

impl State {
    /// The progress of `run` at `path`: resumed when the file holds the
    /// same run (unless `restart`), else new.
    pub fn open(
        path: &Path,
        run: &str,
        open_end: Option<DateTime<Utc>>,
        restart: bool,
    ) -> anyhow::Result<(State, bool)> {
        let fresh = Saved {
            run: run.to_string(),
            open_end,
            tenants: BTreeMap::new(),
        };
        let old = match std::fs::read(path) {
            Ok(bytes) => Some(serde_json::from_slice::<Saved>(&bytes).with_context(|| {
                format!(
                    "reading the backfill state {}: not a state file (move it away or pass another --state)",
                    path.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("reading the backfill state {}", path.display()));
            }
        };
        let (saved, resumed) = match old {
            Some(old) if old.run == run && !restart => (old, true),
            _ => (fresh, false),
        };
        let state = State {
            path: Some(path.to_path_buf()),
            saved,
        };
        Ok((state, resumed))
    }

    /// Progress kept in memory only.
    pub fn in_memory(run: &str) -> State {
        State {
            path: None,
            saved: Saved {
                run: run.to_string(),
                open_end: None,
                tenants: BTreeMap::new(),
            },
        }
    }

    pub fn position(&self, tenant: &str) -> Position {
        self.saved
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or_else(Position::start)
    }

    /// Records `tenant`'s next position and writes the file.
    pub fn advance(&mut self, tenant: &str, next: Position) -> anyhow::Result<()> {
        self.saved.tenants.insert(tenant.to_string(), next);
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&self.saved)?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing the backfill state {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_resumed_for_the_same_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (mut s, resumed) = State::open(&path, "run-a", None, false).unwrap();
        assert!(!resumed);
        assert_eq!(s.position("t"), Position::start());
        let at = Position {
            window: 1,
            page: 4,
            done: false,
        };
        s.advance("t", at).unwrap();
        let (s, resumed) = State::open(&path, "run-a", None, false).unwrap();
        assert!(resumed);
        assert_eq!(s.position("t"), at);
        let (s, _) = State::open(&path, "run-a", None, true).unwrap();
        assert_eq!(s.position("t"), Position::start(), "--restart");
        let (s, resumed) = State::open(&path, "run-b", None, false).unwrap();
        assert!(!resumed);
        assert_eq!(s.position("t"), Position::start(), "another run");
        assert!(holds(&path, "run-a") && !holds(&path, "run-b"));
        let end = Utc::now();
        State::open(&path, "run-c", Some(end), false)
            .unwrap()
            .0
            .advance("t", at)
            .unwrap();
        assert_eq!(saved_open_end(&path), Some(end));
        std::fs::write(&path, "garbage").unwrap();
        let e = State::open(&path, "run-a", None, false).unwrap_err();
        assert!(format!("{e:#}").contains("not a state file"), "{e:#}");
    }
}
