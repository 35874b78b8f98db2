//! `backfill`: call-ended events for the calls Uincall's call list
//! (查询通话记录V2.0) knows, produced to the input topic so that the worker
//! enriches them on its one path. For calls whose event never arrived (a
//! push never sent, retention that ran out during an outage, the weeks
//! before the service was installed), and, with `--skip-enriched`, as a
//! reconcile that submits only the sessions missing from the output topic.
//!
//! Per tenant, the range is cut into windows of at most
//! `backfill.window_days` ([`range`]); each window is asked page by page
//! (`backfill.page_size`, up to a short or empty page) and read leniently
//! ([`list`]); a page's events are produced (key = `session_id`, headers
//! `uincall.source: backfill` and `uincall.tenant`) and, once the broker
//! acknowledged all of them, the next page is recorded in the state file
//! ([`state`]): a run stopped by Ctrl-C or a kill continues where it was and
//! submits at most one page again. API calls keep to the worker's rate
//! limits and retry schedule; a systemic errcode, or an API that stays
//! unreachable through the retries, stops the run (exit 3), an answer that
//! cannot be read too (exit 1), each with its message.
//!
//! - [`range`]: `--from`/`--to` in the tenant's zone, and the windows.
//! - [`list`]: one page of the call list, read leniently.
//! - [`enriched`]: the keys already on the output topic.
//! - [`state`]: the progress file.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::classify::{ApiFailure, ErrcodePolicy};
use crate::event::TENANT_HEADER;
use crate::kafka;
use crate::pipeline::{Outgoing, ProduceError, Publisher};
use crate::rate_limit::RateLimits;
use crate::settings::Settings;
use crate::stats::Stats;
use crate::uincall::{TokenStore, UincallClient};

pub mod enriched;
pub mod list;
pub mod range;
pub mod state;

use enriched::Enriched;
use list::{Listed, PageError, read_page};
use range::{TimeArg, Window, windows};
use state::{Position, State};

/// The `uincall.source` header of a backfilled event.
pub const SOURCE: &str = "backfill";

/// Options of `uincall-enricher backfill`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackfillArgs {
    /// A tenant to backfill (repeat the option for more).
    #[arg(
        long = "tenant",
        value_name = "ID",
        required_unless_present = "all_tenants"
    )]
    pub tenants: Vec<String>,
    /// Every tenant with an API access token (api.tokens, api.tokens_dir).
    #[arg(long, conflicts_with = "tenants")]
    pub all_tenants: bool,
    /// Start of the range, inclusive: RFC 3339, YYYY-MM-DD or
    /// "YYYY-MM-DD HH:MM[:SS]" in the tenant's time zone, today or
    /// yesterday (midnight in the tenant's zone).
    #[arg(long, value_name = "TIME")]
    pub from: TimeArg,
    /// End of the range, exclusive; the same forms [default: now].
    #[arg(long, value_name = "TIME")]
    pub to: Option<TimeArg>,
    /// Skip sessions already on the output topic (a reconcile: only the
    /// missing ones are submitted).
    #[arg(long)]
    pub skip_enriched: bool,
    /// Count per window and show a sample of the sessions that would be
    /// submitted; write nothing (no events, no state).
    #[arg(long)]
    pub dry_run: bool,
    /// The progress file: a run of the same tenants and range continues
    /// from it.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "uincall-backfill.state.json"
    )]
    pub state: PathBuf,
    /// Start from the beginning, whatever the state file says.
    #[arg(long)]
    pub restart: bool,
}

/// `uincall-enricher backfill`: runs until done, an error or
/// SIGTERM/SIGINT, prints the summary; the exit code says how it went (see
/// [`Summary::exit_code`]).
pub async fn run(settings: Settings, args: BackfillArgs) -> ExitCode {
    let result = match crate::shutdown::on_signals() {
        Ok(stop) => execute(settings, args, stop).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(summary) => {
            print!("{}", summary.render());
            if let Some(stopped) = &summary.stopped {
                error!(reason = %stopped.message, "backfill stopped");
                eprintln!("error: {}", stopped.message);
            }
            summary.exit_code()
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "backfill failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why a run stopped before the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// 3: the API is unusable (systemic errcode, or unreachable through
    /// the retries); 1: anything else.
    pub code: u8,
    pub message: String,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub tenants: usize,
    pub windows: usize,
    /// Pages asked and read.
    pub pages: u64,
    /// Sessions the call list gave.
    pub listed: u64,
    /// Already on the output topic (`--skip-enriched`).
    pub skipped_enriched: u64,
    /// Events produced and acknowledged.
    pub submitted: u64,
    /// With `--dry-run`: sessions that would be submitted.
    pub missing: u64,
    /// With `--dry-run`: sessions per window, as lines.
    pub per_window: Vec<String>,
    /// With `--dry-run`: a few sessions that would be submitted.
    pub sample: Vec<String>,
    pub dry_run: bool,
    /// Continued from the state file.
    pub resumed: bool,
    pub interrupted: bool,
    pub stopped: Option<Stopped>,
}

const SAMPLE: usize = 10;

impl Summary {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: u64| out.push_str(&format!("  {k:<22} {v}\n"));
        line("tenants", self.tenants as u64);
        line("windows", self.windows as u64);
        line("pages", self.pages);
        line("sessions listed", self.listed);
        line("skipped, enriched", self.skipped_enriched);
        if self.dry_run {
            line("would submit", self.missing);
            out.push_str("sessions per window:\n");
            for w in &self.per_window {
                out.push_str(&format!("  {w}\n"));
            }
            out.push_str("sample of sessions to submit:\n");
            for s in &self.sample {
                out.push_str(&format!("  {s}\n"));
            }
        } else {
            line("submitted", self.submitted);
        }
        if self.resumed {
            out.push_str("continued from the state file\n");
        }
        if self.interrupted {
            out.push_str("interrupted: run again to continue\n");
        }
        out
    }

    /// 0 done, 1 failed, 3 the API is unusable (try later), 130
    /// interrupted.
    pub fn exit_code(&self) -> ExitCode {
        match (&self.stopped, self.interrupted) {
            (Some(s), _) => ExitCode::from(s.code),
            (None, true) => ExitCode::from(130),
            (None, false) => ExitCode::SUCCESS,
        }
    }
}

/// One tenant's part of the run.
struct Plan {
    tenant: String,
    zone: Tz,
    windows: Vec<Window>,
}

/// Runs a backfill until done, an error that stops it, or `stop`.
pub async fn execute(
    settings: Settings,
    args: BackfillArgs,
    stop: CancellationToken,
) -> anyhow::Result<Summary> {
    let tokens = TokenStore::from_settings(&settings.api)?;
    let (plans, mut state, resumed) = plans_and_state(&settings, &args, &tokens, Utc::now())?;
    let mut summary = Summary {
        tenants: plans.len(),
        windows: plans.iter().map(|p| p.windows.len()).sum(),
        dry_run: args.dry_run,
        resumed,
        ..Summary::default()
    };
    let k = &settings.kafka;
    kafka::check_connection(k).await?;
    let enriched = match args.skip_enriched {
        false => Enriched::default(),
        true => match read_enriched(k, &stop).await? {
            Some(e) => e,
            None => {
                summary.interrupted = true;
                return Ok(summary);
            }
        },
    };
    let publisher = input_publisher(&settings, args.dry_run).await?;
    info!(
        tenants = plans.len(),
        windows = summary.windows,
        resumed,
        dry_run = args.dry_run,
        enriched = enriched.len(),
        "backfill started"
    );
    let mut run = Run {
        settings: &settings,
        client: UincallClient::new(&settings.api, 4)?.with_tenant_bases(&settings.tenants),
        tokens,
        limits: RateLimits::new(&settings.rate_limit, &settings.tenants),
        policy: ErrcodePolicy::from_settings(&settings.retry),
        publisher,
        enriched,
        state: &mut state,
        summary: &mut summary,
        stop: &stop,
        bar: bar("backfill", "sessions"),
        last_log: Instant::now(),
    };
    for plan in &plans {
        if let Err(stopped) = run.tenant(plan).await {
            run.summary.stopped = stopped;
            break;
        }
    }
    run.bar.finish_and_clear();
    Ok(summary)
}

/// The run's plans, its state and whether it resumes an earlier run.
/// Without `--to` the range ends `now`; a rerun of a run stopped on the
/// way keeps the end that run had, or it would be another run. A dry run
/// keeps its state in memory.
fn plans_and_state(
    settings: &Settings,
    args: &BackfillArgs,
    tokens: &TokenStore,
    now: DateTime<Utc>,
) -> anyhow::Result<(Vec<Plan>, State, bool)> {
    let kept = (args.to.is_none() && !args.dry_run && !args.restart)
        .then(|| state::saved_open_end(&args.state))
        .flatten();
    let mut plans = plan(settings, args, tokens, now, kept.unwrap_or(now))?;
    if kept.is_some() && !state::holds(&args.state, &run_id(settings, &plans)) {
        plans = plan(settings, args, tokens, now, now)?;
    }
    let run_id = run_id(settings, &plans);
    let open_end = args.to.is_none().then(|| kept.unwrap_or(now));
    let (state, resumed) = match args.dry_run {
        true => (State::in_memory(&run_id), false),
        false => State::open(&args.state, &run_id, open_end, args.restart)?,
    };
    Ok((plans, state, resumed))
}

/// The producer of the events a run submits to the input topic; none in a
/// dry run.
async fn input_publisher(settings: &Settings, dry_run: bool) -> anyhow::Result<Option<Publisher>> {
    if dry_run {
        return Ok(None);
    }
    let stats = Arc::new(Stats::default());
    let topics = [settings.kafka.input_topic.as_str()];
    Ok(Some(Publisher::new(settings, stats, &topics).await?))
}

/// The session ids already on the output topic (`--skip-enriched`), read
/// with a progress bar; `None` when `stop` came first.
async fn read_enriched(
    k: &crate::settings::KafkaSettings,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Enriched>> {
    let (k, reading) = (k.clone(), stop.clone());
    let bar = bar("reading the output topic", "records");
    let b = bar.clone();
    let read = tokio::task::spawn_blocking(move || {
        enriched::read(&k, &reading, |n, total| {
            b.set_length(total);
            b.set_position(n);
        })
    })
    .await??;
    bar.finish_and_clear();
    Ok(read)
}

/// The tenants, their zones and windows; every tenant must have a token.
/// `now` resolves `today` and `yesterday`; `end` is the end without `--to`.
fn plan(
    settings: &Settings,
    args: &BackfillArgs,
    tokens: &TokenStore,
    now: DateTime<Utc>,
    end: DateTime<Utc>,
) -> anyhow::Result<Vec<Plan>> {
    let tenants = match args.all_tenants {
        true => tokens.tenant_ids(),
        false => {
            let mut t = args.tenants.clone();
            t.sort();
            t.dedup();
            t
        }
    };
    if tenants.is_empty() {
        bail!(
            "no tenant to backfill: --all-tenants found no access token (api.tokens, api.tokens_dir)"
        );
    }
    let mut plans = Vec::new();
    for tenant in tenants {
        if tokens.get(&tenant).is_none() {
            bail!(
                "no access token is configured for tenant `{tenant}` (api.tokens, api.tokens_dir)"
            );
        }
        let name = (settings.tenants.get(&tenant))
            .and_then(|t| t.time_zone.clone())
            .unwrap_or_else(|| settings.backfill.time_zone.clone());
        let zone: Tz = name
            .parse()
            .map_err(|_| anyhow::anyhow!("unknown time zone {name}"))?;
        let resolve = |t: &TimeArg| t.resolve(zone, now).map_err(anyhow::Error::msg);
        let from = resolve(&args.from).context("--from")?;
        let to = match &args.to {
            Some(t) => resolve(t).context("--to")?,
            None => end,
        };
        if from >= to {
            bail!("--from ({from}) is not before --to ({to}) for tenant `{tenant}` in {zone}");
        }
        plans.push(Plan {
            windows: windows(from, to, settings.backfill.window_days),
            tenant,
            zone,
        });
    }
    Ok(plans)
}

/// What makes two runs the same run (for the state file).
fn run_id(settings: &Settings, plans: &[Plan]) -> String {
    let mut id = format!(
        "window_days={} page_size={}",
        settings.backfill.window_days, settings.backfill.page_size
    );
    for p in plans {
        let (from, to) = (p.windows.first(), p.windows.last());
        let at = |w: Option<&Window>, end: bool| {
            w.map_or("-".into(), |w| {
                if end { w.end } else { w.start }.to_rfc3339()
            })
        };
        id.push_str(&format!(
            " {}:{}..{}",
            p.tenant,
            at(from, false),
            at(to, true)
        ));
    }
    id
}

/// A run under way.
struct Run<'a> {
    settings: &'a Settings,
    client: UincallClient,
    tokens: TokenStore,
    limits: RateLimits,
    policy: ErrcodePolicy,
    /// `None` in a dry run.
    publisher: Option<Publisher>,
    enriched: Enriched,
    state: &'a mut State,
    summary: &'a mut Summary,
    stop: &'a CancellationToken,
    bar: ProgressBar,
    last_log: Instant,
}

/// How a tenant's part ended early: `Some` stops the run, `None` is an
/// interruption (already counted).
type Early = Option<Stopped>;

impl Run<'_> {
    /// Lists and submits one tenant's windows from where its state says.
    async fn tenant(&mut self, plan: &Plan) -> Result<(), Early> {
        let mut at = self.state.position(&plan.tenant);
        if at.done {
            return Ok(());
        }
        let size = self.settings.backfill.page_size;
        while at.window < plan.windows.len() {
            let window = plan.windows[at.window];
            let mut in_window = 0u64;
            loop {
                let page = self.page(plan, &window, at.page).await?;
                let count = page.len();
                in_window += self.submit(&plan.tenant, page).await? as u64;
                at = match count < size as usize {
                    true => Position {
                        window: at.window + 1,
                        page: 1,
                        done: at.window + 1 == plan.windows.len(),
                    },
                    false => Position {
                        page: at.page + 1,
                        ..at
                    },
                };
                self.state.advance(&plan.tenant, at).map_err(|e| {
                    Some(Stopped {
                        code: 1,
                        message: format!("{e:#}"),
                    })
                })?;
                self.tick(&plan.tenant);
                if at.page == 1 {
                    break;
                }
            }
            if self.summary.dry_run {
                let (start, end) = window.api_times(plan.zone);
                self.summary.per_window.push(format!(
                    "{} {start} .. {end} ({}): {in_window} to submit",
                    plan.tenant, plan.zone
                ));
            }
        }
        Ok(())
    }

    /// One page of a window, asked again after a failure as the worker's
    /// calls are (backoff, `Retry-After`, rate limits).
    async fn page(
        &mut self,
        plan: &Plan,
        window: &Window,
        page: u32,
    ) -> Result<Vec<Listed>, Early> {
        let (start, end) = window.api_times(plan.zone);
        let query = page_query(&start, &end, page, self.settings.backfill.page_size);
        let tenant = plan.tenant.as_str();
        let mut delays = page_delays(&self.settings.retry);
        loop {
            let (answer, secret) = self.call_page(tenant, &query).await?;
            let stopped = |code, what: &str, reason: &str| {
                Err(Some(Stopped {
                    code,
                    message: format!(
                        "{what} (tenant {tenant}, window {start} .. {end}, page {page}): {}",
                        reason.replace(secret.as_str(), "[redacted]")
                    ),
                }))
            };
            let failure = match read_page(&answer, &self.policy) {
                Ok(sessions) => {
                    self.limits.answered(tenant);
                    self.summary.pages += 1;
                    self.summary.listed += sessions.len() as u64;
                    return Ok(sessions);
                }
                Err(PageError::RateLimited(f)) => {
                    let wait = self.limits.limited(tenant, f.retry_after);
                    warn!(tenant, page, wait = ?wait, "the call list says too many calls; waiting");
                    continue;
                }
                Err(PageError::Systemic(f)) => {
                    return stopped(3, "the API is unusable", &f.reason);
                }
                Err(PageError::Permanent(f)) => {
                    return stopped(1, "the call list refused the request", &f.reason);
                }
                Err(PageError::Unreadable(m)) => {
                    return stopped(1, "the call list answer cannot be read", &m);
                }
                Err(PageError::Retry(f)) => f,
            };
            let Some(delay) = next_delay(&mut delays, &failure) else {
                let code = if answer.is_outage() { 3 } else { 1 };
                return stopped(
                    code,
                    "the call list kept failing through the retries",
                    &failure.reason,
                );
            };
            warn!(tenant, page, retry_in = ?delay, reason = failure.reason.replace(secret.as_str(), "[redacted]"), "the call list failed; retrying");
            tokio::select! {
                _ = self.stop.cancelled() => return Err(self.interrupted()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One call for a page, within the tenant's rate limit: its answer and
    /// the token's text (to keep out of messages).
    async fn call_page(
        &mut self,
        tenant: &str,
        query: &Value,
    ) -> Result<(crate::classify::ApiAnswer, String), Early> {
        if !self.limits.acquire(tenant, self.stop).await {
            return Err(self.interrupted());
        }
        let Some(token) = self.tokens.get(tenant) else {
            return Err(Some(Stopped {
                code: 1,
                message: format!("no access token for tenant `{tenant}`"),
            }));
        };
        let answer = self.client.list_page(tenant, &token, query).await.answer;
        let secret = secrecy::ExposeSecret::expose_secret(&token).to_string();
        Ok((answer, secret))
    }

    /// Submits a page's sessions that are missing (all of them unless
    /// `--skip-enriched`), together, and waits for every acknowledgement.
    /// Returns how many were (or, in a dry run, would be) submitted.
    async fn submit(&mut self, tenant: &str, page: Vec<Listed>) -> Result<usize, Early> {
        let listed = page.len();
        let missing: Vec<Listed> = page
            .into_iter()
            .filter(|l| !self.enriched.contains(&l.session_id))
            .collect();
        self.summary.skipped_enriched += (listed - missing.len()) as u64;
        self.bar.set_position(self.summary.listed);
        let Some(publisher) = &self.publisher else {
            self.note_missing(tenant, &missing);
            return Ok(missing.len());
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "uincall.source",
                value: Some(SOURCE),
            })
            .insert(Header {
                key: TENANT_HEADER,
                value: Some(tenant),
            });
        let e = &self.settings.event;
        let events: Vec<Vec<u8>> = (missing.iter()).map(|l| event_of(e, tenant, l)).collect();
        let topic = self.settings.kafka.input_topic.as_str();
        let sends = missing.iter().zip(&events).map(|(l, payload)| {
            publisher.send(
                Outgoing {
                    topic,
                    key: Some(l.session_id.as_bytes()),
                    payload,
                    headers: &headers,
                    origin: None,
                },
                self.stop,
            )
        });
        for result in futures::future::join_all(sends).await {
            match result {
                Ok(()) => self.summary.submitted += 1,
                Err(ProduceError::Abandoned) => return Err(self.interrupted()),
                Err(e) => {
                    return Err(Some(Stopped {
                        code: 1,
                        message: format!("producing to {topic} failed: {e}"),
                    }));
                }
            }
        }
        Ok(missing.len())
    }

    /// A dry run: the missing sessions counted, the first few kept as a
    /// sample.
    fn note_missing(&mut self, tenant: &str, missing: &[Listed]) {
        self.summary.missing += missing.len() as u64;
        let room = SAMPLE.saturating_sub(self.summary.sample.len());
        for l in missing.iter().take(room) {
            self.summary
                .sample
                .push(format!("{tenant} {}", l.session_id));
        }
    }

    fn interrupted(&mut self) -> Early {
        self.summary.interrupted = true;
        None
    }

    /// A log line every few seconds when there is no progress bar.
    fn tick(&mut self, tenant: &str) {
        if self.bar.is_hidden() && self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            let s = &self.summary;
            info!(
                tenant,
                pages = s.pages,
                listed = s.listed,
                submitted = s.submitted,
                skipped_enriched = s.skipped_enriched,
                "backfill progress"
            );
        }
    }
}

/// The wait before asking again after `failure`: the next backoff delay,
/// at least its `Retry-After`; `None` when the attempts are used up.
fn next_delay(
    delays: &mut impl Iterator<Item = Duration>,
    failure: &ApiFailure,
) -> Option<Duration> {
    let delay = delays.next()?;
    Some(failure.retry_after.map_or(delay, |after| delay.max(after)))
}

/// Sets `path` (dots descend into objects, created as needed) to `value`.
fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut at = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !at.is_object() {
            *at = json!({});
        }
        let map = at.as_object_mut().expect("made an object");
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        at = map.entry(part.to_string()).or_insert_with(|| json!({}));
    }
}

fn bar(what: &str, unit: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::no_length();
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {what}: {{pos}} {unit}, {{per_sec}}"))
            .expect("a valid template"),
    );
    bar
}

/// The call list's query for one page of a window, every kind of call.
fn page_query(start: &str, end: &str, page: u32, size: u32) -> Value {
    json!({
        "kind": 0, "page": page, "size": size, "all": true,
        "start_time": start, "end_time": end,
    })
}

/// The delays between the calls for one page: the worker's backoff, as
/// many as `retry.max_attempts` allows after the first call.
fn page_delays(r: &crate::settings::RetrySettings) -> impl Iterator<Item = Duration> + use<> {
    use backon::BackoffBuilder;
    crate::retry::backoff(r)
        .with_max_times(r.max_attempts.saturating_sub(1) as usize)
        .build()
}

/// The call-ended event of a listed session, its fields where `[event]`
/// says they are.
fn event_of(e: &crate::settings::EventSettings, tenant: &str, l: &Listed) -> Vec<u8> {
    let mut event = json!({});
    set_path(&mut event, &e.session_id_field, json!(l.session_id));
    set_path(&mut event, &e.tenant_id_field, json!(tenant));
    if let Some(ct) = l.call_type {
        set_path(&mut event, &e.call_type_field, json!(ct));
    }
    event.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_ids_where_the_worker_reads_them() {
        let mut v = json!({});
        set_path(&mut v, "data.session_id", json!("s-1"));
        set_path(&mut v, "tenant_id", json!("t"));
        set_path(&mut v, "data.call_type", json!(5));
        assert_eq!(
            v,
            json!({"data": {"session_id": "s-1", "call_type": 5}, "tenant_id": "t"})
        );
    }

    #[test]
    fn exit_codes_say_how_the_run_went() {
        let code = |s: Summary| format!("{:?}", s.exit_code());
        assert_eq!(code(Summary::default()), format!("{:?}", ExitCode::SUCCESS));
        let interrupted = Summary {
            interrupted: true,
            ..Summary::default()
        };
        assert_eq!(code(interrupted), format!("{:?}", ExitCode::from(130)));
        let stopped = Summary {
            stopped: Some(Stopped {
                code: 3,
                message: "x".into(),
            }),
            interrupted: true,
            ..Summary::default()
        };
        assert_eq!(code(stopped), format!("{:?}", ExitCode::from(3)));
    }
}
