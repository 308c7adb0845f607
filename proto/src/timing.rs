//! How fast a dead link is noticed: the QUIC keep-alive interval and idle timeout both daemons
//! use (`--keep-alive-ms`, `--idle-timeout-ms`). QUIC takes the smaller idle timeout of the two
//! ends, so the destination's setting bounds every source's, and a source can only shorten it.

use std::time::Duration;

/// Keep-alive interval and idle timeout of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// A connection silent for this long is dead.
    pub idle_timeout: Duration,
    /// A keep-alive is sent when the connection has been quiet this long.
    pub keep_alive: Duration,
}

/// The defaults: a dead link or peer is noticed within 2 s (issue 10: within 3 s).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 2000;
/// Four keep-alives per idle timeout: one lost keep-alive is not a dead link.
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 500;

impl Default for LinkTiming {
    fn default() -> Self {
        LinkTiming {
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            keep_alive: Duration::from_millis(DEFAULT_KEEP_ALIVE_MS),
        }
    }
}

/// Settings that would make the link flap or never notice a dead peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimingError {
    /// The idle timeout is outside 200 ms ..= 10 min.
    #[error("--idle-timeout-ms {0}: use 200 to 600000 ms")]
    IdleTimeout(u64),
    /// The keep-alive is not shorter than the idle timeout, or below 50 ms.
    #[error(
        "--keep-alive-ms {keep_alive}: use at least 50 ms and less than half of \
         --idle-timeout-ms ({idle_timeout}), so one lost keep-alive does not end the link"
    )]
    KeepAlive {
        /// The keep-alive asked for, ms.
        keep_alive: u64,
        /// The idle timeout, ms.
        idle_timeout: u64,
    },
}

impl LinkTiming {
    /// The timing for `idle_timeout_ms` and `keep_alive_ms`, checked.
    pub fn from_millis(idle_timeout_ms: u64, keep_alive_ms: u64) -> Result<Self, TimingError> {
        if !(200..=600_000).contains(&idle_timeout_ms) {
            return Err(TimingError::IdleTimeout(idle_timeout_ms));
        }
        if keep_alive_ms < 50 || keep_alive_ms.saturating_mul(2) > idle_timeout_ms {
            return Err(TimingError::KeepAlive {
                keep_alive: keep_alive_ms,
                idle_timeout: idle_timeout_ms,
            });
        }
        Ok(LinkTiming {
            idle_timeout: Duration::from_millis(idle_timeout_ms),
            keep_alive: Duration::from_millis(keep_alive_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_settings_are_refused() {
        assert_eq!(
            LinkTiming::from_millis(DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_KEEP_ALIVE_MS),
            Ok(LinkTiming::default())
        );
        assert!(LinkTiming::from_millis(100, 20).is_err());
        assert!(LinkTiming::from_millis(2000, 1500).is_err());
        assert!(LinkTiming::from_millis(2000, 10).is_err());
        assert!(LinkTiming::from_millis(30_000, 5000).is_ok());
        assert!(LinkTiming::from_millis(700_000, 5000).is_err());
    }
}
