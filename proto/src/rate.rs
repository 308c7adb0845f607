//! Recent throughput for status and metrics: records and bytes per second over the last few
//! seconds, from per-second buckets. Sans-IO: the caller says what second it is (seconds since
//! any fixed start), so it is tested without a clock.

/// Seconds the rate is averaged over.
pub const WINDOW_SECS: u64 = 10;

/// One bucket per second: the window's full seconds plus the current, partial one.
const BUCKETS: u64 = WINDOW_SECS + 1;

/// Counts of the last [`WINDOW_SECS`] seconds and the current one, one bucket per second.
#[derive(Debug, Clone, Default)]
pub struct RecentRate {
    /// (second, records, bytes), indexed by second modulo [`BUCKETS`].
    buckets: [(u64, u64, u64); BUCKETS as usize],
}

/// Records and bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Rates {
    /// Records per second.
    pub records_per_second: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
}

impl RecentRate {
    /// Count `records` records of `bytes` bytes at second `now`.
    pub fn add(&mut self, now: u64, records: u64, bytes: u64) {
        let b = &mut self.buckets[(now % BUCKETS) as usize];
        if b.0 != now {
            *b = (now, 0, 0);
        }
        b.1 = b.1.saturating_add(records);
        b.2 = b.2.saturating_add(bytes);
    }

    /// The average over the [`WINDOW_SECS`] seconds before `now` (the current, partial second
    /// left out, so a burst is not overstated).
    pub fn rates(&self, now: u64) -> Rates {
        let (mut records, mut bytes) = (0u64, 0u64);
        for &(sec, r, b) in &self.buckets {
            if sec < now && now - sec <= WINDOW_SECS {
                records = records.saturating_add(r);
                bytes = bytes.saturating_add(b);
            }
        }
        Rates {
            records_per_second: records as f64 / WINDOW_SECS as f64,
            bytes_per_second: bytes as f64 / WINDOW_SECS as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_full_seconds_only() {
        let mut r = RecentRate::default();
        assert_eq!(r.rates(0), Rates::default());
        for s in 100..110 {
            r.add(s, 10, 1000);
        }
        r.add(110, 500, 50_000); // the current second: not counted yet
        assert_eq!(
            r.rates(110),
            Rates {
                records_per_second: 10.0,
                bytes_per_second: 1000.0
            }
        );
        // Old buckets age out; a reused bucket starts from zero.
        assert_eq!(r.rates(125), Rates::default());
        r.add(130, 1, 1);
        assert_eq!(r.rates(131).records_per_second, 0.1);
    }
}
