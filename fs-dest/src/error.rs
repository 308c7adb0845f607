//! Error types of the destination daemon, one enum per subsystem.
//!
//! Each variant carries the context an operator needs to act (file names, source names,
//! sequence numbers); `main`/`run` turn them into `anyhow` errors for the final report.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Creating, reading or using certificates.
#[derive(Debug, Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The CA already exists; `certs init` never overwrites it.
    #[error("{path} already exists: refusing to overwrite an existing CA (remove the directory's ca.pem/ca.key first if you really want a new one)")]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A certificate or key file exists already.
    #[error("{path} already exists: refusing to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The name is not acceptable as a source name.
    #[error("invalid source name {name:?}: it must match [A-Za-z0-9][A-Za-z0-9._-]{{0,62}}")]
    BadName {
        /// The name given.
        name: String,
    },
    /// A certificate or the revocation list could not be parsed.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A --san value is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}")]
    BadSan(String),
    /// rcgen refused to build or parse a certificate.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done (names the file when one is involved).
        what: String,
        /// Why.
        source: rcgen::Error,
    },
}

/// Building the TLS/QUIC endpoint or identifying a peer.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("client certificate verifier from {path}: {reason}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The rustls configuration is not usable for QUIC.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    /// Binding the UDP socket failed.
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The peer presented no usable identity.
    #[error("peer identity: {0}")]
    Identity(String),
}

/// Journal files.
#[derive(Debug, Error)]
pub enum JournalError {
    /// I/O on the journal failed.
    #[error("journal {path}: {what}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The header is not a journal header of this version, or names another source/partition.
    #[error("journal {path}: bad header: {reason}")]
    BadHeader {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A damaged record with valid records after it (not a torn tail).
    #[error("journal {path}: corrupt record at offset {offset}: {reason}; valid records follow it, so nothing past it will be applied")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A caller tried to append a frame that does not belong (bad frame or sequence).
    #[error("journal {path}: refusing to append record {seq}: {reason}")]
    BadAppend {
        /// The journal file.
        path: PathBuf,
        /// Sequence number of the record.
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// The slot table in the NVRAM user area.
#[derive(Debug, Error)]
pub enum SlotError {
    /// Name empty, too long or with a NUL.
    #[error("source name {name:?} cannot be stored in the slot table: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Every slot is taken.
    #[error("the slot table is full ({0} sources); cannot register source {1:?}")]
    Full(usize, String),
    /// Flushing the slot to NVRAM failed.
    #[error("flushing the slot table: {0}")]
    Flush(#[from] io::Error),
}

/// A consistency point that could not complete.
#[derive(Debug, Error)]
pub enum CpError {
    /// A journal could not be read or trimmed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The image tree could not be opened.
    #[error("image of source {source_name}: {reason}")]
    Image {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// Records needed by the CP are missing from the journals.
    #[error(
        "source {source_name}: CP up to {last_seq} needs record {missing}, which is in no journal"
    )]
    Gap {
        /// The source.
        source_name: String,
        /// The CP's last sequence number.
        last_seq: u64,
        /// The first missing sequence number.
        missing: u64,
    },
    /// The CP asks for records that were never received.
    #[error("source {source_name}: CP up to {last_seq} but only {accepted} records were received")]
    Ahead {
        /// The source.
        source_name: String,
        /// The CP's last sequence number.
        last_seq: u64,
        /// Highest sequence number received.
        accepted: u64,
    },
    /// The destager did not journal the records in time.
    #[error("source {source_name}: records up to {last_seq} were not destaged within {seconds} s")]
    DestageTimeout {
        /// The source.
        source_name: String,
        /// The CP's last sequence number.
        last_seq: u64,
        /// How long we waited.
        seconds: u64,
    },
    /// syncfs or the NVRAM flush failed.
    #[error("source {source_name}: making the CP durable: {source}")]
    Sync {
        /// The source.
        source_name: String,
        /// Why.
        source: io::Error,
    },
    /// The blocking task panicked or was cancelled.
    #[error("source {source_name}: CP task failed: {reason}")]
    Task {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
}

/// Why a CP request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum CpSubmitError {
    /// The source already has `limit` requests waiting.
    #[error("more than {limit} CP requests queued; closing the connection")]
    TooMany {
        /// The most a source may have queued.
        limit: usize,
    },
    /// The worker is gone (the server is stopping).
    #[error("the CP worker has stopped")]
    Stopped,
}
