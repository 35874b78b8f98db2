//! A dead letter read back (its `dlq.*` headers and replay count) and
//! re-submitted: to the input topic, produced as the worker produces, or
//! enriched directly.

use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{REPLAY_COUNT, REPLAYED_FROM, ReplayArgs};
use crate::dead_letter::{Stamp, header as dlq};
use crate::otel;
use crate::pipeline::{Disposition, Enricher, InRecord, Outgoing, ProduceError, Publisher};
use crate::record::Source;
use crate::settings::Settings;
use crate::stats::Stats;

/// How one matched record ended.
pub(super) enum Resubmitted {
    Acknowledged,
    /// With `--direct`: the record failed again and its new dead letter was
    /// acknowledged (it is done: the next run sees the new dead letter).
    DeadLetteredAgain(String),
    /// Nothing reached the broker: the record stays uncommitted.
    Failed(String),
    /// Shutdown came first: not committed, replayed by the next run.
    Abandoned,
}

/// A dead letter's `dlq.*` headers and how often it was replayed before.
pub(super) fn read_dead_letter(m: &BorrowedMessage<'_>) -> (Stamp, u32) {
    let Some(hs) = m.headers() else {
        return (Stamp::default(), 0);
    };
    let stamp = Stamp::read(hs.iter().map(|h| (h.key, h.value)));
    let replays = hs
        .iter()
        .filter(|h| h.key == REPLAY_COUNT && h.value.is_some())
        .last()
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        .unwrap_or(0);
    (stamp, replays)
}

/// The record to re-submit: the original key and value, the original
/// headers without `dlq.*`, `replay.count` incremented and `replay.from`;
/// its source is the original input record.
pub(super) fn resubmission(
    m: &BorrowedMessage<'_>,
    d: &Stamp,
    replays: u32,
    dlq_topic: &str,
) -> InRecord {
    let mut headers: Vec<(String, Option<Vec<u8>>)> = m
        .headers()
        .map(|hs| {
            hs.iter()
                .filter(|h| {
                    !h.key.starts_with(dlq::PREFIX)
                        && h.key != REPLAY_COUNT
                        && h.key != REPLAYED_FROM
                })
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    headers.push((
        REPLAY_COUNT.to_string(),
        Some((replays + 1).to_string().into_bytes()),
    ));
    headers.push((
        REPLAYED_FROM.to_string(),
        Some(format!("{dlq_topic}/{}/{}", m.partition(), m.offset()).into_bytes()),
    ));
    InRecord {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
        source: Source {
            topic: d.source_topic.clone().unwrap_or_default(),
            partition: d.source_partition.unwrap_or(-1),
            offset: d.source_offset.unwrap_or(-1),
            timestamp_ms: d.source_timestamp,
        },
        origin: None,
    }
}

/// Where re-submissions go.
#[derive(Clone)]
pub(super) enum Target {
    /// Back to the input topic, produced as the worker produces.
    Input(Arc<Publisher>, String),
    Direct(Arc<Enricher>),
}

impl Target {
    pub(super) async fn new(settings: &Arc<Settings>, args: &ReplayArgs) -> anyhow::Result<Target> {
        if args.direct {
            let stats = Arc::new(Stats::default());
            let enricher = Enricher::build(settings.clone(), stats).await?;
            return Ok(Target::Direct(Arc::new(enricher)));
        }
        let topic = settings.kafka.input_topic.clone();
        let stats = Arc::new(Stats::default());
        let publisher = Publisher::new(settings, stats, &[&topic]).await?;
        Ok(Target::Input(Arc::new(publisher), topic))
    }

    pub(super) fn start_helpers(
        &self,
        stop: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        match self {
            Target::Direct(e) => e.start_helpers(stop),
            Target::Input(..) => Vec::new(),
        }
    }

    pub(super) async fn resubmit(&self, rec: InRecord, stop: CancellationToken) -> Resubmitted {
        match self {
            Target::Direct(enricher) => match enricher.process(rec, stop).await {
                Ok(Disposition::Enriched) => Resubmitted::Acknowledged,
                Ok(Disposition::DeadLettered(class)) => {
                    Resubmitted::DeadLetteredAgain(format!("dead-lettered again ({class})"))
                }
                Ok(Disposition::Unwritable(class)) => Resubmitted::Failed(format!(
                    "failed again ({class}), and the dead-letter topic refused its dead letter at every size"
                )),
                Ok(Disposition::Abandoned) => Resubmitted::Abandoned,
                Err(e) => Resubmitted::Failed(format!("{e:#}")),
            },
            Target::Input(publisher, topic) => {
                // The re-submission continues the dead letter's trace.
                let send = otel::send_span(topic);
                otel::continue_trace(&send, &rec.headers);
                let headers = otel::with_trace(rec.headers_without_dlq(), &send);
                let out = Outgoing {
                    topic,
                    key: rec.key.as_deref(),
                    payload: rec.payload.as_deref().unwrap_or_default(),
                    headers: &headers,
                    origin: None,
                };
                match publisher.send(out, &stop).instrument(send).await {
                    Ok(()) => Resubmitted::Acknowledged,
                    Err(ProduceError::Abandoned) => Resubmitted::Abandoned,
                    Err(e) => Resubmitted::Failed(format!("producing to {topic}: {e}")),
                }
            }
        }
    }
}
