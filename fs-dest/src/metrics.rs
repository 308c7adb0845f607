//! The opt-in Prometheus endpoint of `fs-dest serve --metrics-listen ADDR`: plain HTTP
//! `GET /metrics` in the OpenMetrics text format, one series per source (label `source`).
//!
//! The figures of `fs-dest status` are read at scrape time from the same report
//! ([`status::snapshot`]), so the two never disagree; the promotion state comes from the
//! promotion markers. The only state status has no equivalent for, the duration of each
//! source's CPs, is kept in `cp_durations`. Metric names are documented in docs/operations.md
//! ("Metrics").
//!
//! The HTTP side is shared with fs-source: [`proto::metrics_http`].

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cp_durations::CP_DURATIONS;
use crate::engine::Engine;
use crate::status::{self, SourceStatus};

/// The figures of `fs-dest status`, read from the engine at each scrape.
pub struct DestCollector {
    engine: Arc<Engine>,
    started: Instant,
}

impl fmt::Debug for DestCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestCollector").finish_non_exhaustive()
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

/// How a per-source figure is encoded.
enum Kind {
    /// A gauge.
    Gauge,
    /// A counter (`name` without `_total`: the encoder appends it).
    Counter,
}

/// One series per source of a figure (`None`: no sample for that source).
fn per_source(
    enc: &mut DescriptorEncoder,
    sources: &[SourceStatus],
    (name, help, kind): (&str, &str, Kind),
    figure: impl Fn(&SourceStatus) -> Option<f64>,
) -> fmt::Result {
    let metric_type = match kind {
        Kind::Gauge => MetricType::Gauge,
        Kind::Counter => MetricType::Counter,
    };
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for s in sources {
        let Some(v) = figure(s) else { continue };
        let labels = [("source", s.name.as_str())];
        let mut e = m.encode_family(&labels)?;
        // Whole numbers (counts, sequence numbers) are written as integers; f64 holds them
        // exactly up to 2^53.
        let whole = v.fract() == 0.0 && (0.0..9.0e15).contains(&v);
        match kind {
            Kind::Counter => e.encode_counter::<NoLabelSet, _, u64>(&(v as u64), None)?,
            Kind::Gauge if whole => e.encode_gauge(&(v as u64))?,
            Kind::Gauge => e.encode_gauge(&v)?,
        }
    }
    Ok(())
}

impl Collector for DestCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let report = status::snapshot(&self.engine);
        let sources = &report.sources;
        let e = &mut enc;
        let none: [(&str, &str); 0] = [];
        e.encode_descriptor(
            "nvmirror_dest_build",
            "The daemon's version (always 1).",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        gauge(
            e,
            "nvmirror_dest_uptime_seconds",
            "Seconds since this server started.",
            &none,
            self.started.elapsed().as_secs_f64(),
        )?;
        gauge(
            e,
            "nvmirror_dest_sources",
            "Sources known to this destination.",
            &none,
            sources.len() as u64,
        )?;
        let flag = |b: bool| Some(if b { 1.0 } else { 0.0 });
        let n = |v: u64| Some(v as f64);
        use Kind::{Counter, Gauge};
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_link_up",
                "1 while a connection serves the source, else 0.",
                Gauge,
            ),
            |s| flag(s.connected),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_generation",
                "The source's generation (fencing epoch).",
                Gauge,
            ),
            |s| s.generation.and_then(n),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_durable_seq",
                "Highest sequence number of the source held durably (NVRAM or journals).",
                Gauge,
            ),
            |s| s.durable_seq.and_then(n),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_applied_seq",
                "Highest sequence number of the source applied to its image.",
                Gauge,
            ),
            |s| s.applied_seq.and_then(n),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_backlog_records",
                "Records of the source held durably but not yet applied to its image (the \
                 next CP applies them).",
                Gauge,
            ),
            |s| n(s.durable_seq?.saturating_sub(s.applied_seq?)),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_records_received",
                "Records of the source accepted since this server started.",
                Counter,
            ),
            |s| n(s.records_received),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_bytes_received",
                "Bytes of the source's records accepted since this server started.",
                Counter,
            ),
            |s| n(s.bytes_received),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_cps",
                "Consistency points of the source completed since this server started.",
                Counter,
            ),
            |s| n(s.cp_count),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_last_cp_age_seconds",
                "Seconds since the source's last consistency point completed (absent before \
                 the first since this server started).",
                Gauge,
            ),
            |s| s.last_cp_age_seconds,
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_last_cp_duration_seconds",
                "How long the source's last consistency point took (absent before the first \
                 since this server started).",
                Gauge,
            ),
            |s| s.last_cp_seconds,
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_last_record_age_seconds",
                "Seconds since the source's last record arrived (absent before the first since \
                 this server started).",
                Gauge,
            ),
            |s| s.last_record_age_seconds,
        )?;
        CP_DURATIONS.encode(e.encode_descriptor(
            "nvmirror_dest_cp_duration_seconds",
            "Durations of the source's consistency points completed since this server started.",
            None,
            CP_DURATIONS.metric_type(),
        )?)?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_apply_errors",
                "Records of the source that failed to apply at a CP since this server started.",
                Counter,
            ),
            |s| n(s.apply_errors),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_transient_records",
                "Records of the source that CPs left out since this server started: files created and removed within one CP's window.",
                Counter,
            ),
            |s| n(s.transient_records),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_journal_bytes",
                "Bytes in the source's journal files.",
                Gauge,
            ),
            |s| n(s.journal_bytes),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_out_of_sync",
                "1 when paths of the source's image are known to differ from the source.",
                Gauge,
            ),
            |s| flag(s.out_of_sync > 0),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_out_of_sync_paths",
                "How many paths of the source's image are known to differ from the source.",
                Gauge,
            ),
            |s| n(s.out_of_sync),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_baseline_incomplete",
                "1 while the source's image does not hold the whole volume yet (baseline).",
                Gauge,
            ),
            |s| flag(s.sync == "baseline"),
        )?;
        per_source(
            e,
            sources,
            (
                "nvmirror_dest_promoted",
                "1 when the source's image was promoted to a primary volume (the old source \
                 is fenced until a demote).",
                Gauge,
            ),
            |s| flag(s.promoted),
        )?;
        type Figure = fn(&crate::engine::PartitionFill) -> u64;
        let per_partition: [(&str, &str, Figure); 3] = [
            (
                "nvmirror_dest_nvlog_used_bytes",
                "Bytes of frames in a partition of the destination NVLOG.",
                |p| p.used_bytes as u64,
            ),
            (
                "nvmirror_dest_nvlog_capacity_bytes",
                "Capacity of a partition of the destination NVLOG in bytes.",
                |p| p.capacity_bytes as u64,
            ),
            (
                "nvmirror_dest_nvlog_records",
                "Frames in a partition of the destination NVLOG.",
                |p| p.records,
            ),
        ];
        for (name, help, figure) in per_partition {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in &report.nvlog.partitions {
                m.encode_family(&[("partition", p.index.to_string())])?
                    .encode_gauge(&figure(p))?;
            }
        }
        Ok(())
    }
}

/// The registry a scrape encodes.
pub fn registry(engine: Arc<Engine>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DestCollector {
        engine,
        started: Instant::now(),
    }));
    r
}

pub use proto::metrics_http::{bind, serve};
