//! The opt-in Prometheus endpoint of `fs-source mount --metrics-listen ADDR`: plain HTTP
//! `GET /metrics` in the OpenMetrics text format.
//!
//! Every figure is read at scrape time from the same report `fs-source status` prints
//! ([`control::status`]), so the two never disagree; the only state status has no equivalent
//! for, the CP duration histogram, is kept in `cp_durations`. Metric names are documented in
//! docs/operations.md ("Metrics").
//!
//! The HTTP side is shared with fs-dest: [`proto::metrics_http`].

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::{self, Identity};
use crate::cp_durations::CP_DURATIONS;
use crate::mirror::Mirror;

/// The figures of `fs-source status`, read from the mirror at each scrape.
pub struct SourceCollector {
    mirror: Arc<Mirror>,
    id: Identity,
}

impl fmt::Debug for SourceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceCollector")
            .field("name", &self.id.name)
            .finish()
    }
}

/// One gauge sample with `labels`.
fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &impl EncodeLabelSet,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_family(labels)?
        .encode_gauge(&v)
}

/// One counter sample with `labels` (`name` without `_total`: the encoder appends it).
fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &impl EncodeLabelSet,
    v: u64,
) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

impl Collector for SourceCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = control::status(&self.mirror, &self.id);
        let l = [("source", s.name.as_str())];
        let e = &mut enc;
        e.encode_descriptor(
            "nvmirror_source_build",
            "The daemon's version (always 1).",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("source", s.name.as_str()), ("version", s.version)])?;
        gauge(
            e,
            "nvmirror_source_uptime_seconds",
            "Seconds since this daemon started.",
            &l,
            s.uptime_seconds,
        )?;
        gauge(
            e,
            "nvmirror_source_generation",
            "Generation of the volume (raised by promotions and failbacks).",
            &l,
            s.generation,
        )?;
        counter(
            e,
            "nvmirror_source_records_logged",
            "Highest sequence number logged in NVRAM and applied locally (records of this \
             generation).",
            &l,
            s.last_logged_seq,
        )?;
        gauge(
            e,
            "nvmirror_source_flushed_seq",
            "Highest sequence number flushed in local NVRAM.",
            &l,
            s.last_flushed_seq,
        )?;
        gauge(
            e,
            "nvmirror_source_acked_seq",
            "Highest sequence number acknowledged by the destination.",
            &l,
            s.last_acked_seq,
        )?;
        gauge(
            e,
            "nvmirror_source_applied_seq",
            "Highest sequence number applied to the destination's image (last CP).",
            &l,
            s.last_applied_seq,
        )?;
        counter(
            e,
            "nvmirror_source_records_mirrored",
            "Records acknowledged by the destination since this daemon started.",
            &l,
            s.records_mirrored,
        )?;
        counter(
            e,
            "nvmirror_source_bytes_mirrored",
            "Bytes acknowledged by the destination since this daemon started.",
            &l,
            s.bytes_mirrored,
        )?;
        gauge(
            e,
            "nvmirror_source_lag_records",
            "Records logged but not yet acknowledged by the destination.",
            &l,
            s.lag_records,
        )?;
        gauge(
            e,
            "nvmirror_source_lag_seconds",
            "Seconds the oldest unacknowledged record has waited (0 when in sync).",
            &l,
            s.lag_seconds,
        )?;
        if let Some(age) = s.last_ack_age_seconds {
            gauge(
                e,
                "nvmirror_source_last_ack_age_seconds",
                "Seconds since the destination last acknowledged a record (absent before the \
                 first acknowledgement).",
                &l,
                age,
            )?;
        }
        counter(
            e,
            "nvmirror_source_cps",
            "Consistency points completed since this daemon started.",
            &l,
            s.cp_count,
        )?;
        if let Some(age) = s.last_cp_age_seconds {
            gauge(
                e,
                "nvmirror_source_last_cp_age_seconds",
                "Seconds since the last consistency point completed (absent before the first).",
                &l,
                age,
            )?;
        }
        if let Some(took) = s.last_cp_seconds {
            gauge(
                e,
                "nvmirror_source_last_cp_duration_seconds",
                "How long the last consistency point took (absent before the first).",
                &l,
                took,
            )?;
        }
        let mut hist = e.encode_descriptor(
            "nvmirror_source_cp_duration_seconds",
            "Durations of the consistency points completed since this daemon started.",
            None,
            CP_DURATIONS.metric_type(),
        )?;
        CP_DURATIONS.encode(hist.encode_family(&l)?)?;
        gauge(
            e,
            "nvmirror_source_backlog_records",
            "Records moved to the backlog file while the destination was away.",
            &l,
            s.backlog_records,
        )?;
        gauge(
            e,
            "nvmirror_source_backlog_bytes",
            "Bytes in the backlog file.",
            &l,
            s.backlog_bytes,
        )?;
        gauge(
            e,
            "nvmirror_source_link_up",
            "1 while a connection to the destination is established, else 0 (also 0 when \
             unmirrored).",
            &l,
            u32::from(s.link == "up"),
        )?;
        if let Some(a) = &s.async_leg {
            gauge(
                e,
                "nvmirror_source_async_link_up",
                "1 while the asynchronous second leg (--async-dest) is connected, else 0.",
                &l,
                u32::from(a.link == "up"),
            )?;
            gauge(
                e,
                "nvmirror_source_async_lag_records",
                "Records logged that the asynchronous second leg has not acknowledged.",
                &l,
                a.lag_records as i64,
            )?;
            gauge(
                e,
                "nvmirror_source_async_lag_seconds",
                "Since when the oldest record unacknowledged by the second leg waits, seconds.",
                &l,
                a.lag_seconds,
            )?;
            gauge(
                e,
                "nvmirror_source_async_applied_seq",
                "Highest record applied to the second destination's image.",
                &l,
                a.applied_seq as i64,
            )?;
        }
        gauge(
            e,
            "nvmirror_source_degraded",
            "1 while policy sync runs alone until the destination catches up.",
            &l,
            u32::from(s.degraded),
        )?;
        gauge(
            e,
            "nvmirror_source_stopped",
            "1 when the destination refused this source for good (fenced by a promotion, \
             name mismatch...): mirroring stopped, the reason is in status.",
            &l,
            u32::from(s.stopped.is_some()),
        )?;
        {
            let mut m = e.encode_descriptor(
                "nvmirror_source_sync_state",
                "1 for the current sync state of the image (in-sync, out-of-sync, resyncing, \
                 baseline, none), 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            for state in ["in-sync", "out-of-sync", "resyncing", "baseline", "none"] {
                m.encode_family(&[("source", s.name.as_str()), ("state", state)])?
                    .encode_gauge(&u32::from(s.sync == state))?;
            }
        }
        gauge(
            e,
            "nvmirror_source_out_of_sync",
            "1 when paths of the image are known to differ from this volume (records failed \
             to apply; they are being resent).",
            &l,
            u32::from(s.out_of_sync > 0),
        )?;
        gauge(
            e,
            "nvmirror_source_out_of_sync_paths",
            "How many paths of the image are known to differ from this volume.",
            &l,
            s.out_of_sync,
        )?;
        gauge(
            e,
            "nvmirror_source_resync_pending_paths",
            "Paths being resent (or queued) to the image.",
            &l,
            s.resync_pending,
        )?;
        let b = &s.baseline;
        gauge(
            e,
            "nvmirror_source_baseline_entries_done",
            "Entries the baseline has sent.",
            &l,
            b.files_done,
        )?;
        gauge(
            e,
            "nvmirror_source_baseline_entries_total",
            "Entries in the tree when the baseline started.",
            &l,
            b.files_total,
        )?;
        gauge(
            e,
            "nvmirror_source_baseline_bytes_done",
            "Bytes of file content the baseline has sent.",
            &l,
            b.bytes_done,
        )?;
        gauge(
            e,
            "nvmirror_source_baseline_bytes_total",
            "Bytes of file content in the tree when the baseline started.",
            &l,
            b.bytes_total,
        )?;
        let partition_labels: Vec<[(&str, String); 2]> = s
            .partitions
            .iter()
            .map(|p| {
                [
                    ("source", s.name.clone()),
                    ("partition", p.index.to_string()),
                ]
            })
            .collect();
        type Figure = fn(&control::PartitionStatus) -> u64;
        let per_partition: [(&str, &str, Figure); 3] = [
            (
                "nvmirror_source_partition_used_bytes",
                "Bytes of records in an NVLOG partition.",
                |p| p.used_bytes as u64,
            ),
            (
                "nvmirror_source_partition_capacity_bytes",
                "Capacity of an NVLOG partition in bytes.",
                |p| p.capacity_bytes as u64,
            ),
            (
                "nvmirror_source_partition_records",
                "Records in an NVLOG partition.",
                |p| p.records,
            ),
        ];
        for (name, help, figure) in per_partition {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (p, labels) in s.partitions.iter().zip(&partition_labels) {
                m.encode_family(labels)?.encode_gauge(&figure(p))?;
            }
        }
        Ok(())
    }
}

/// The registry a scrape encodes: the status figures and the CP histogram.
pub fn registry(mirror: Arc<Mirror>, id: Identity) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(SourceCollector { mirror, id }));
    r
}

pub use proto::metrics_http::{bind, serve};
