//! How long each source's consistency points take: a histogram per source, fed by the CP
//! worker (`cp`) and exported by the metrics endpoint (`metrics`). Its own module so that the
//! code running CPs does not depend on the exporter (which reads `status`, which drives
//! `promote`, which runs CPs).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// The label set of a per-source series.
pub type SourceLabel = [(&'static str, String); 1];

/// One CP duration histogram per source.
pub type CpFamily = Family<SourceLabel, Histogram, fn() -> Histogram>;

/// A CP duration histogram (1 ms to about 33 s, doubling).
fn cp_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Durations of each source's completed CPs since this server started.
pub static CP_DURATIONS: LazyLock<CpFamily> =
    LazyLock::new(|| Family::new_with_constructor(cp_histogram as fn() -> Histogram));

/// Count a completed CP of `source` that took `took`.
pub fn observe(source: &str, took: Duration) {
    CP_DURATIONS
        .get_or_create(&[("source", source.to_string())])
        .observe(took.as_secs_f64());
}
