//! The CP lock of an image: the CP applier (`cp::apply_through`, inside `fs-dest serve`, and
//! `promote`) holds it exclusively while it changes the image in place; each `browse`
//! operation and each `verify` listing holds it shared, so that it sees the image either wholly
//! before or wholly after a CP.
//!
//! ```text
//! applier (exclusive)                 browse, around every FUSE operation (shared)
//!   flock(cp.gate, EX)                  flock(cp.gate, SH)   -- waits while a CP is pending
//!   flock(cp.lock, EX)                  flock(cp.lock, SH)
//!   apply records, syncfs               unlock(cp.gate)
//!   unlock both                         the operation (stat, read, readdir, ...)
//!                                       unlock(cp.lock)
//! ```
//!
//! `cp.lock` is the reader/writer lock proper. `cp.gate` keeps a steady stream of browse
//! operations from starving the applier (Linux `flock` grants a shared lock whenever it is
//! compatible with the holders, ignoring a waiting exclusive request): readers hold the gate
//! only between two system calls, so the applier gets it at once, and while it holds it no new
//! reader starts; the applier then waits only for the operations already running. Each
//! operation opens its own descriptors (flock belongs to the open file description, and FUSE
//! threads run operations concurrently).

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FlockOperation, Mode, OFlags};

/// The reader/writer lock file in `ROOT/NAME/`.
pub const LOCK_NAME: &str = "cp.lock";
/// The turnstile lock file in `ROOT/NAME/`.
pub const GATE_NAME: &str = "cp.gate";

fn open_lock_file(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?)
}

/// A held CP lock (shared or exclusive); released on drop.
#[derive(Debug)]
pub struct CpLock {
    _lock: OwnedFd,
    _gate: Option<OwnedFd>,
}

impl CpLock {
    /// Take the lock of the source directory `dir` (`ROOT/NAME`) exclusively, as the CP
    /// applier does; blocks until every running browse operation has finished.
    pub fn exclusive(dir: &Path) -> std::io::Result<CpLock> {
        let gate = open_lock_file(&dir.join(GATE_NAME))?;
        let lk = open_lock_file(&dir.join(LOCK_NAME))?;
        rustix::fs::flock(&gate, FlockOperation::LockExclusive)?;
        rustix::fs::flock(&lk, FlockOperation::LockExclusive)?;
        Ok(CpLock {
            _lock: lk,
            _gate: Some(gate),
        })
    }

    /// Take the lock of `dir` shared, as one browse operation does; blocks during a CP.
    pub fn shared(dir: &Path) -> std::io::Result<CpLock> {
        let gate = open_lock_file(&dir.join(GATE_NAME))?;
        let lk = open_lock_file(&dir.join(LOCK_NAME))?;
        rustix::fs::flock(&gate, FlockOperation::LockShared)?;
        rustix::fs::flock(&lk, FlockOperation::LockShared)?;
        drop(gate);
        Ok(CpLock {
            _lock: lk,
            _gate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_shared_and_shared_waits_for_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let reader = CpLock::shared(&d).unwrap();
        let (tx, rx) = mpsc::channel();
        let d2 = d.clone();
        let writer = std::thread::spawn(move || {
            let w = CpLock::exclusive(&d2).unwrap();
            tx.send(()).unwrap();
            w
        });
        // The applier cannot start while a browse operation runs.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(reader);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("exclusive lock after the reader left");
        let w = writer.join().unwrap();
        // A browse operation cannot start during the CP.
        let (tx, rx) = mpsc::channel();
        let d3 = d.clone();
        let r2 = std::thread::spawn(move || {
            let r = CpLock::shared(&d3).unwrap();
            tx.send(()).unwrap();
            drop(r);
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(w);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("shared lock after the CP");
        r2.join().unwrap();
    }
}
