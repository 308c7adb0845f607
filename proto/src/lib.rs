//! nvmirror's shared language: what both daemons say and store.
//!
//! * [`record`]: one mutating file operation ([`record::Op`]) and its sequence number.
//! * [`frame`]: the self-checking byte layout (length, sequence, partition, CRC32C) in which a
//!   record lives in NVRAM, on the wire and in journals.
//! * [`nvlog`]: the partitioned write-ahead log inside an NVRAM region, with its recovery scan.
//! * [`storage`]: the NVRAM region itself, behind a small trait (a memory-mapped file, or plain
//!   memory for tests).
//! * [`wire`]: messages between source and destination.
//! * [`path`]: validation of the relative paths records carry.
//! * [`summary`]: what `verify` compares of an entry (metadata and a content hash), computed
//!   the same way on both sides.
//! * [`peer`]: who may reach a daemon's control socket, and which socket a client may trust
//!   (modes, owners, SO_PEERCRED), the same for both daemons.
//! * [`inspect`]: offline verification of the daemons' files (NVRAM, backlog, journals) for
//!   `fs-source check` and `fs-dest check`.
//! * [`pool`]: reused buffers for frames and messages (no page faults per record).
//! * [`dir_cache`]: open directories of a tree by path, forgotten when renamed or removed.
//! * [`apply`]: the one piece of code that applies a record to a directory tree, shared by the
//!   source (its backing volume, at recovery) and the destination (its image, at a CP).
//!
//! Everything but `storage::MmapStorage` and `apply` is sans-IO: it takes bytes and returns
//! values, so it is tested without a mount or a socket.

pub mod apply;
pub mod config;
pub mod crc_shift;
pub mod dir_cache;
pub mod fd_limit;
pub mod frame;
pub mod fscheck;
pub mod handle;
pub mod inspect;
pub mod memory;
pub mod metrics_http;
pub mod nvlog;
pub mod path;
pub mod peer;
pub mod pool;
pub mod rate;
pub mod record;
pub mod replay;
pub mod storage;
pub mod summary;
pub mod timing;
pub mod transport;
pub mod wire;

pub use frame::{Frame, FrameError, FrameHeader};
pub use handle::Handle;
pub use nvlog::{NvLog, NvLogError};
pub use record::{Entry, Op, TimesEntry, Timestamp};
