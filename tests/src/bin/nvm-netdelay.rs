//! `nvm-netdelay`: delays (and optionally reorders) packets between two test hosts, where the
//! kernel has no `netem`.
//!
//! An iptables rule sends packets to an NFQUEUE queue
//! (`iptables -I INPUT -i DEV -j NFQUEUE --queue-num N --queue-bypass`); this program binds that
//! queue, holds each packet for `--delay-ms` and then issues its ACCEPT verdict. With
//! `--reorder-percent P --reorder-extra-ms X`, P % of the packets (chosen at random) are held X ms
//! longer, so that packets queued after them overtake them. Verdicts are therefore issued out of
//! order by packet id, which NFQUEUE allows.
//!
//! ```text
//! nvm-netdelay --queue 7447 --delay-ms 2.5 [--reorder-percent 10 --reorder-extra-ms 2]
//!              [--seed N] [--max-queue-len 65536]
//! ```
//!
//! Once the queue is bound it prints `nvm-netdelay: ready queue N` on stdout (a test waits for
//! that line instead of sleeping). On SIGTERM or SIGINT it accepts every packet it still holds,
//! prints a summary line on stderr (`nvm-netdelay: exit: packets P, reordered R, ...`) and exits
//! 0. It also gets SIGTERM when the process (thread) that started it dies
//! (`PR_SET_PDEATHSIG`), so a killed test does not leave it running in a namespace.
//!
//! The queue is configured to *fail open*: when it is full the kernel accepts packets instead of
//! dropping them, and with `--queue-bypass` on the rule packets pass when no program is bound
//! (this one died). A delay tool must never turn into a packet-loss tool by accident.
//!
//! It speaks `NETLINK_NETFILTER` itself (through `libc`), metadata only (no packet payload is
//! copied): the `nfq` crate was tried first but its `Queue` does not expose its socket's file
//! descriptor, so it cannot be polled with a timeout, which is what a delay line needs.
//!
//! Packets of one class are held in arrival order (a FIFO per class: the normal one and the
//! reordered one, each with a constant hold time, so each FIFO is sorted by deadline); the main
//! loop `ppoll`s the netlink socket and a signalfd with the time to the earliest deadline.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

// ---------------------------------------------------------------------------------------------
// Netlink / nfnetlink_queue constants (linux/netfilter/nfnetlink_queue.h, linux/netlink.h)

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQA_CFG_F_GSO: u32 = 4;

const NF_ACCEPT: u32 = 1;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Netlink attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Receive buffer for one netlink datagram: with metadata-only copies a packet message is a
/// few hundred bytes, but errors echo the request and the kernel may batch.
const RECV_BUF: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Command line

/// What the command line asks for.
#[derive(Debug)]
struct Options {
    /// NFQUEUE queue number to bind.
    queue: u16,
    /// How long every packet is held.
    delay: Duration,
    /// Percentage (0–100) of packets held `reorder_extra` longer.
    reorder_percent: f64,
    /// Extra hold of the reordered packets.
    reorder_extra: Duration,
    /// Seed of the reordering choice.
    seed: u64,
    /// Kernel queue length (packets) before fail-open lets packets through undelayed.
    max_queue_len: u32,
}

const USAGE: &str = "usage: nvm-netdelay --queue N --delay-ms MS \
[--reorder-percent P --reorder-extra-ms MS] [--seed N] [--max-queue-len N]";

fn parse_ms(flag: &str, value: &str) -> Result<Duration> {
    let ms: f64 = value
        .parse()
        .with_context(|| format!("{flag} {value:?}: not a number of milliseconds"))?;
    if !ms.is_finite() || !(0.0..=60_000.0).contains(&ms) {
        bail!("{flag} {value}: must be between 0 and 60000 ms");
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options> {
    let mut queue = None;
    let mut delay = None;
    let mut reorder_percent = 0.0;
    let mut reorder_extra = Duration::ZERO;
    let mut seed = None;
    let mut max_queue_len = 65_536;
    let mut args = args;
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--queue" => {
                queue = Some(
                    value
                        .parse()
                        .with_context(|| format!("--queue {value:?}: not a queue number"))?,
                )
            }
            "--delay-ms" => delay = Some(parse_ms(&flag, &value)?),
            "--reorder-percent" => {
                reorder_percent = value
                    .parse()
                    .with_context(|| format!("--reorder-percent {value:?}: not a number"))?;
                if !(0.0..=100.0).contains(&reorder_percent) {
                    bail!("--reorder-percent {value}: must be between 0 and 100");
                }
            }
            "--reorder-extra-ms" => reorder_extra = parse_ms(&flag, &value)?,
            "--seed" => {
                seed = Some(
                    value
                        .parse()
                        .with_context(|| format!("--seed {value:?}: not a number"))?,
                )
            }
            "--max-queue-len" => {
                max_queue_len = value
                    .parse()
                    .with_context(|| format!("--max-queue-len {value:?}: not a number"))?
            }
            _ => bail!("unknown argument {flag:?}\n{USAGE}"),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id())
    });
    Ok(Options {
        queue: queue.with_context(|| format!("--queue is required\n{USAGE}"))?,
        delay: delay.with_context(|| format!("--delay-ms is required\n{USAGE}"))?,
        reorder_percent,
        reorder_extra,
        seed,
        max_queue_len,
    })
}

// ---------------------------------------------------------------------------------------------
// A netlink socket speaking nfnetlink_queue

/// Builds one netlink message: header, nfgenmsg, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(msg_type: u16, flags: u16, queue: u16) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        b.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg_type).to_ne_bytes());
        b.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        // Sequence number, then port id (0: the kernel).
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, resource id = queue (big endian).
        b.push(libc::AF_UNSPEC as u8);
        b.push(0);
        b.extend_from_slice(&queue.to_be_bytes());
        Msg(b)
    }

    fn attr(mut self, attr_type: u16, payload: &[u8]) -> Msg {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&attr_type.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// What one received netlink message was.
enum Incoming {
    /// A queued packet, by id.
    Packet(u32),
    /// An acknowledgement (errno 0) or an error (errno > 0).
    Ack(i32),
    /// Anything else.
    Other,
}

/// The `NETLINK_NETFILTER` socket.
struct NfQueue {
    fd: libc::c_int,
    queue: u16,
    buf: Vec<u8>,
}

impl NfQueue {
    /// Opens the socket and binds queue `queue`: metadata-only copies, GSO packets whole,
    /// fail-open, `max_len` packets of kernel queue.
    fn open(queue: u16, max_len: u32) -> Result<NfQueue> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .context("socket(AF_NETLINK, NETLINK_NETFILTER)");
        }
        let mut q = NfQueue {
            fd,
            queue,
            buf: vec![0; RECV_BUF],
        };
        // SAFETY: an all-zero sockaddr_nl is valid (family set below; pid 0 = kernel assigns).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).context("bind netlink socket");
        }
        // A large receive buffer: when it overflows the kernel lets packets through undelayed
        // (fail-open), which would quietly weaken the delay. SO_RCVBUFFORCE needs root (we
        // are); fall back to SO_RCVBUF.
        let size: libc::c_int = 16 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with a c_int option value of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
        // The command struct is { u8 command; u8 pad; be16 pf }.
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, queue)
                .attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]),
        )
        .with_context(|| {
            format!("bind NFQUEUE queue {queue} (another program bound to it? not root?)")
        })?;
        // Params: { be32 copy_range; u8 copy_mode } packed: metadata only.
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, queue)
                .attr(NFQA_CFG_PARAMS, &params),
        )
        .context("set NFQUEUE copy mode")?;
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, queue)
                .attr(NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
        )
        .context("set NFQUEUE queue length")?;
        let flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO;
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, queue)
                .attr(NFQA_CFG_FLAGS, &flags.to_be_bytes())
                .attr(NFQA_CFG_MASK, &flags.to_be_bytes()),
        )
        .context("set NFQUEUE flags (fail-open, GSO)")?;
        Ok(q)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `msg` is a valid buffer of the length passed; `addr` a valid sockaddr_nl.
            let rc = unsafe {
                libc::sendto(
                    self.fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if err.kind() == io::ErrorKind::WouldBlock {
                // Netlink sends to the kernel are processed synchronously; a full socket
                // buffer here is transient. Wait until writable.
                self.wait(libc::POLLOUT, Some(Duration::from_millis(100)))?;
                continue;
            }
            return Err(err);
        }
    }

    /// Waits (bounded) for the socket to be ready for `events`.
    fn wait(&self, events: libc::c_short, timeout: Option<Duration>) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Sends a request with NLM_F_ACK and waits (up to 5 s) for its acknowledgement. Packet
    /// messages arriving meanwhile are accepted at once (this only happens during setup).
    fn request(&mut self, msg: Msg) -> Result<()> {
        self.send(&msg.finish())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no acknowledgement from the kernel within 5 s");
            }
            self.wait(libc::POLLIN, Some(left))?;
            let mut early = Vec::new();
            let mut ack = None;
            self.recv_batch(|m| match m {
                Incoming::Ack(errno) => ack = Some(errno),
                Incoming::Packet(id) => early.push(id),
                Incoming::Other => {}
            })?;
            for id in early {
                self.accept(id)?;
            }
            match ack {
                Some(0) => return Ok(()),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno).into()),
                None => {}
            }
        }
    }

    /// Reads every datagram available now (non-blocking) and hands each message to `each`.
    /// Returns how many datagrams were read; ENOBUFS (the kernel could not queue a message to
    /// us) is counted in `overruns` and otherwise ignored.
    fn recv_batch(&mut self, mut each: impl FnMut(Incoming)) -> io::Result<usize> {
        let mut datagrams = 0;
        loop {
            // SAFETY: `buf` is a valid writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(datagrams),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        OVERRUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    _ => return Err(err),
                }
            }
            datagrams += 1;
            parse_datagram(&self.buf[..n as usize], &mut each);
        }
    }

    /// Issues the ACCEPT verdict for packet `id`.
    fn accept(&self, id: u32) -> io::Result<()> {
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        let msg = Msg::new(NFQNL_MSG_VERDICT, 0, self.queue).attr(NFQA_VERDICT_HDR, &hdr);
        self.send(&msg.finish())
    }

    /// Unbinds the queue (best effort: closing the socket does it too).
    fn unbind(&mut self) {
        let _ = self.send(
            &Msg::new(NFQNL_MSG_CONFIG, 0, self.queue)
                .attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])
                .finish(),
        );
    }
}

impl Drop for NfQueue {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this struct owns, once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// Datagrams the kernel could not deliver to us (receive buffer full).
static OVERRUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits one datagram into netlink messages. Malformed input ends the parse (it can only come
/// from the kernel, so this is defensive).
fn parse_datagram(mut b: &[u8], each: &mut impl FnMut(Incoming)) {
    while b.len() >= NLMSG_HDRLEN {
        let (Some(len), Some(msg_type)) = (u32_at(b, 0), u16_at(b, 4)) else {
            return;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return;
        }
        let body = &b[NLMSG_HDRLEN..len];
        match msg_type {
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .and_then(|e| e.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .unwrap_or(0);
                each(Incoming::Ack(-errno));
            }
            NLMSG_DONE => each(Incoming::Ack(0)),
            t if t == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET => {
                match packet_id(body.get(NFGENMSG_LEN..).unwrap_or(&[])) {
                    Some(id) => each(Incoming::Packet(id)),
                    None => each(Incoming::Other),
                }
            }
            _ => each(Incoming::Other),
        }
        let aligned = (len + 3) & !3;
        b = b.get(aligned..).unwrap_or(&[]);
    }
}

/// The packet id from a packet message's attributes (NFQA_PACKET_HDR: be32 id, be16 proto, u8
/// hook).
fn packet_id(mut attrs: &[u8]) -> Option<u32> {
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0)? as usize;
        let attr_type = u16_at(attrs, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if attr_type == NFQA_PACKET_HDR {
            return Some(u32::from_be_bytes(attrs.get(4..8)?.try_into().ok()?));
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Signals

/// A signalfd for SIGTERM and SIGINT (blocked for normal delivery).
fn signal_fd() -> Result<libc::c_int> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointer and signal numbers; single-threaded program, so
    // sigprocmask is the thread mask.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error()).context("sigprocmask");
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("signalfd");
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a valid signal number.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
    }
    Ok(fd)
}

// ---------------------------------------------------------------------------------------------
// The delay line

/// splitmix64, for the reordering choice.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Counters printed at exit.
#[derive(Default)]
struct Stats {
    packets: u64,
    reordered: u64,
    max_held: usize,
    late_max: Duration,
}

fn run(opts: Options) -> Result<()> {
    let sig = signal_fd()?;
    let mut q = NfQueue::open(opts.queue, opts.max_queue_len)?;
    let mut rng = Rng(opts.seed);
    // Each lane has a constant hold time, so it is sorted by deadline.
    let mut normal: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut slow: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut stats = Stats::default();
    {
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "nvm-netdelay: ready queue {} delay {:?} reorder {}% +{:?} seed {}",
            opts.queue, opts.delay, opts.reorder_percent, opts.reorder_extra, opts.seed
        )
        .and_then(|_| out.flush())
        .context("print the ready line")?;
    }
    loop {
        // Release everything due.
        let now = Instant::now();
        for lane in [&mut normal, &mut slow] {
            while let Some(&(due, id)) = lane.front() {
                if due > now {
                    break;
                }
                lane.pop_front();
                stats.late_max = stats.late_max.max(now - due);
                q.accept(id)
                    .with_context(|| format!("verdict for packet {id}"))?;
            }
        }
        let next = [normal.front(), slow.front()]
            .into_iter()
            .flatten()
            .map(|&(due, _)| due)
            .min();
        let timeout = next.map(|due| due.saturating_duration_since(Instant::now()));
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let mut fds = [
            libc::pollfd {
                fd: q.fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sig,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; `ts` outlives the call; null sigmask keeps the current one.
        let rc = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts.as_ref().map_or(std::ptr::null(), |t| t as *const _),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("ppoll");
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents != 0 {
            let arrived = Instant::now();
            let mut acks = Vec::new();
            q.recv_batch(|m| match m {
                Incoming::Packet(id) => {
                    stats.packets += 1;
                    if opts.reorder_percent > 0.0 && rng.next_f64() * 100.0 < opts.reorder_percent {
                        stats.reordered += 1;
                        slow.push_back((arrived + opts.delay + opts.reorder_extra, id));
                    } else {
                        normal.push_back((arrived + opts.delay, id));
                    }
                }
                Incoming::Ack(errno) if errno != 0 => acks.push(errno),
                _ => {}
            })
            .context("receive from the queue")?;
            for errno in acks {
                eprintln!(
                    "nvm-netdelay: kernel reported: {}",
                    io::Error::from_raw_os_error(errno)
                );
            }
            stats.max_held = stats.max_held.max(normal.len() + slow.len());
        }
    }
    // Shutting down: let every held packet go now, so stopping the delay loses nothing.
    let held = normal.len() + slow.len();
    for (_, id) in normal.drain(..).chain(slow.drain(..)) {
        q.accept(id)
            .with_context(|| format!("verdict for packet {id}"))?;
    }
    q.unbind();
    eprintln!(
        "nvm-netdelay: exit: packets {} reordered {} max held {} released at exit {} \
         overruns {} worst lateness {:?}",
        stats.packets,
        stats.reordered,
        stats.max_held,
        held,
        OVERRUNS.load(std::sync::atomic::Ordering::Relaxed),
        stats.late_max
    );
    Ok(())
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    if let Err(e) = result {
        eprintln!("nvm-netdelay: {e:#}");
        std::process::exit(1);
    }
}
