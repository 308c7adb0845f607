//! The open-file limit of a daemon: raised to the hard limit at start, so that the files
//! clients keep open and the directory caches (see [`crate::dir_cache`]) do not run into the
//! soft limit (1024 by default under systemd).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raise the soft limit on open files to the hard limit; returns the limit in force.
pub fn raise() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::debug!(error = %e, "could not raise the open-file limit"),
        }
    }
    limit.current
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let now = super::raise();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(limit.current, now);
        assert_eq!(limit.current, limit.maximum);
    }
}
