//! The QUIC transport settings both ends of a link share: how a dead link is noticed
//! ([`LinkTiming`]), how reordering is told from loss, how often packets are acknowledged,
//! and the send and per-stream windows of one long-lived stream carrying bulk writes. Each
//! daemon adds only what is its own (the destination's window before a Hello, stream limits).

use std::time::Duration;

use quinn_proto::{AckFrequencyConfig, IdleTimeout, TransportConfig, VarInt};

use crate::timing::LinkTiming;

/// The settings both daemons start from.
pub fn shared(timing: LinkTiming) -> TransportConfig {
    let mut t = TransportConfig::default();
    // Within the validated range (200 ms ..= 10 min) this always fits a QUIC varint; the
    // fallback only guards the conversion.
    t.max_idle_timeout(IdleTimeout::try_from(timing.idle_timeout).ok());
    t.keep_alive_interval(Some(timing.keep_alive));
    // Reordering is not loss: a packet counts as lost only when 32 later ones are acknowledged
    // (default 3) or it is 2 round trips late (default 9/8). With the defaults, 5 % of packets
    // 2 ms late on a 5 ms path made quinn declare hundreds of false losses, each cutting the
    // congestion window: one writer fell from ~60 to 5 MiB/s (tests/bench/distance.sh).
    t.packet_threshold(32);
    t.time_threshold(2.0);
    // Ask the peer to acknowledge every 17th packet (or within 10 ms) instead of every
    // second one: a mirrored operation is one packet each way, and each end's next packet
    // carries its acknowledgement anyway, so ACK-only packets were a third of the traffic
    // (4 KiB creates and unlinks: 3.1 -> 2.5 datagrams per record, creates 5-20 % faster;
    // unlinks unchanged). A gap the sender would take for a loss (31 later packets: the packet
    // threshold above, minus one) is still acknowledged at once.
    let mut acks = AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(16))
        .max_ack_delay(Some(Duration::from_millis(10)))
        .reordering_threshold(VarInt::from_u32(31));
    t.ack_frequency_config(Some(acks));
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.send_window(32 << 20);
    t
}
