//! QUIC application close codes the destination ends a source's connection with, so that the
//! source (and a packet capture) can tell why.

/// A bad message or record, or a refused handshake.
pub const ERROR: u32 = 1;
/// A newer connection of the same source replaced this one.
pub const REPLACED: u32 = 2;
/// The server shuts down.
pub const SHUTDOWN: u32 = 3;
/// The source was promoted (fenced) while connected.
pub const FENCED: u32 = 4;
/// The source's certificate was revoked (`fs-dest certs revoke`) while connected.
pub const REVOKED: u32 = 5;
