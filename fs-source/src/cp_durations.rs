//! How long this source's consistency points take: a histogram fed by the mirror when a CP
//! completes and exported by the metrics endpoint (`metrics`). Its own module so that the
//! mirror does not depend on the exporter (which reads the status the control module builds
//! from the mirror).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Durations of completed CPs (1 ms to about 33 s, doubling).
pub static CP_DURATIONS: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));

/// Count a completed CP that took `took` in `nvmirror_source_cp_duration_seconds`.
pub fn observe(took: Duration) {
    CP_DURATIONS.observe(took.as_secs_f64());
}
