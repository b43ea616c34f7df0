//! A TCP ring all-reduce for CPU replicas: reduce-scatter, then all-gather.
//!
//! Each rank holds one connection to its successor (it sends there) and one from its
//! predecessor (it receives from there). The buffer is cut into `world` chunks; in
//! `world − 1` reduce-scatter steps every rank sends one chunk and adds the chunk it
//! receives, after which rank `r` holds the full sum of chunk `r + 1`; `world − 1`
//! all-gather steps then pass the finished chunks around. Every rank sends and receives
//! `2 (world − 1) / world` of the buffer, the bandwidth-optimal amount, and every rank ends
//! with bitwise the same sum (each chunk is summed once, by one rank, in ring order).
//!
//! Every connection starts with a handshake naming the run, the membership generation, the
//! sender's rank and the buffer length, in which both sides prove that they know the run's
//! ring secret ([`gpo_ops::ring_auth`]: HMAC-SHA256 over fresh nonces) before any tensor
//! byte flows; a connection that cannot prove it (a stranger on the ring port) is refused,
//! logged and counted, and the ring goes on waiting for its real member; every message carries a header naming the call, the
//! phase, the chunk and the segment. A mismatch is a clear error. Every read and write has
//! a timeout. The reduction runs on a scratch buffer, so a failed all-reduce leaves the
//! caller's buffer as it was; the ring is then unusable (its streams are out of step) and
//! must be re-formed. [`Collective::aborter`] breaks it from another thread at any time:
//! both sockets are shut down, so a blocked call returns at once with an error saying it
//! was aborted, while the neighbours see a closed connection (a peer failure).
//!
//! **Speed.** Chunks travel as segments of [`SEGMENT`] values, pipelined: a segment that
//! arrives is added (reduce-scatter) or stored (all-gather) and handed at once to the
//! ring's persistent sending thread for the next step, while the next segment is received,
//! so sending, receiving and adding overlap instead of alternating chunk by chunk. Values
//! go on the wire as the buffers' own little-endian bytes (no encoding pass), are received
//! straight into the scratch buffer or a segment-sized buffer, and are added in a loop the
//! compiler vectorizes. The sums are the same additions, in the same order, as before.

mod bytes;
mod link;
#[cfg(test)]
mod tests;

use crate::collective::{Aborter, Collective};
use anyhow::{bail, Context, Result};
use link::{io_failure, Sender, Shared};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAGIC_HELLO: u32 = 0x4750_4f52; // "GPOR"
const MAGIC_CHUNK: u32 = 0x4750_4f43; // "GPOC"
/// 2: messages are segments of chunks (the header names the segment).
const PROTOCOL: u32 = 2;
const HELLO_LEN: usize = 4 + 4 + 8 + 8 + 4 + 4 + 8;
/// magic, call, phase, chunk, segment, values.
pub(crate) const HEADER_LEN: usize = 4 + 8 + 4 + 4 + 4 + 8;
/// Values per segment (256 KiB): small enough to pipeline a 9 MiB gradient in dozens of
/// pieces, large enough that headers and system calls per segment cost nothing.
pub const SEGMENT: usize = 32 * 1024;

/// What identifies one ring: every member must agree on all of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RingId {
    /// A 64-bit tag of the run id ([`run_tag`]).
    pub run_tag: u64,
    /// The membership generation.
    pub generation: u64,
    /// Length in f64 values of the buffer every call reduces.
    pub buffer_len: usize,
    /// The run's ring secret (from the coordinator): members prove they know it.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for RingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingId")
            .field("run_tag", &self.run_tag)
            .field("generation", &self.generation)
            .field("buffer_len", &self.buffer_len)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Longest a connection to the ring port may take to complete its handshake: a stranger
/// that connects and says nothing holds the real member up no longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A 64-bit tag of a run id (FNV-1a), carried in every ring handshake.
pub fn run_tag(run_id: &str) -> u64 {
    run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The connections of a ring of two or more.
struct Link {
    prev: TcpStream,
    sender: Sender,
}

/// One member of a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    id: RingId,
    link: Option<Link>,
    shared: Arc<Shared>,
    timeout: Duration,
    calls: u64,
    broken: Option<String>,
    /// The sum being built; becomes the caller's buffer only when the call succeeds.
    scratch: Vec<f64>,
    /// One received segment during reduce-scatter.
    recv: Vec<f64>,
}

/// The chunk boundaries of a buffer of `len` values cut into `world` nearly equal parts.
fn chunk_range(len: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// The segments of a chunk: pieces of [`SEGMENT`] values, at least one (an empty chunk
/// still sends its header, so both sides stay in step and check each other).
fn segments(r: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let n = r.len().div_ceil(SEGMENT).max(1);
    (0..n).map(move |k| {
        let start = r.start + k * SEGMENT;
        start..(start + SEGMENT).min(r.end)
    })
}

fn io_context(e: std::io::Error, what: &str, peer: usize, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!(io_failure(&e, what, peer, timeout))
}

fn header(call: u64, phase: u32, chunk: usize, seg: usize, values: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC_CHUNK.to_le_bytes());
    h[4..12].copy_from_slice(&call.to_le_bytes());
    h[12..16].copy_from_slice(&phase.to_le_bytes());
    h[16..20].copy_from_slice(&(chunk as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(seg as u32).to_le_bytes());
    h[24..32].copy_from_slice(&(values as u64).to_le_bytes());
    h
}

/// Checks a received header against what this rank expects next.
fn check_header(h: &[u8; HEADER_LEN], pred: usize, expect: [u8; HEADER_LEN]) -> Result<()> {
    if h == &expect {
        return Ok(());
    }
    let word = |h: &[u8], a: usize| u32::from_le_bytes(h[a..a + 4].try_into().unwrap());
    let long = |h: &[u8], a: usize| u64::from_le_bytes(h[a..a + 8].try_into().unwrap());
    if word(h, 0) != MAGIC_CHUNK {
        bail!("ring: rank {pred} sent something that is not a chunk");
    }
    if h[4..24] != expect[4..24] {
        bail!(
            "ring: rank {pred} is out of step: it sent call {} phase {} chunk {} segment {}, expected call {} phase {} chunk {} segment {}",
            long(h, 4),
            word(h, 12),
            word(h, 16),
            word(h, 20),
            long(&expect, 4),
            word(&expect, 12),
            word(&expect, 16),
            word(&expect, 20),
        );
    }
    bail!(
        "ring: rank {pred} sent a segment of {} values, expected {} (buffer sizes differ)",
        long(h, 24),
        long(&expect, 24)
    )
}

impl TcpRing {
    /// Joins a ring as `rank` of `addrs.len()`: connects to the successor at
    /// `addrs[rank + 1]` (retrying until `timeout`) and accepts the predecessor on
    /// `listener` (whose address is `addrs[rank]`). Both sides check each other's
    /// handshake. `timeout` also bounds every later read and write.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: &TcpListener,
        id: RingId,
        timeout: Duration,
    ) -> Result<TcpRing> {
        Self::connect_with(rank, addrs, listener, id, timeout, &Default::default())
    }

    /// [`TcpRing::connect`], counting refused handshakes in `failures`.
    pub fn connect_with(
        rank: usize,
        addrs: &[SocketAddr],
        listener: &TcpListener,
        id: RingId,
        timeout: Duration,
        failures: &gpo_ops::auth::AuthFailures,
    ) -> Result<TcpRing> {
        let world = addrs.len();
        if rank >= world {
            bail!("ring: rank {rank} is outside a world of {world}");
        }
        let mut ring = TcpRing {
            rank,
            world,
            id,
            link: None,
            shared: Arc::new(Shared::new(Vec::new())),
            timeout,
            calls: 0,
            broken: None,
            scratch: Vec::new(),
            recv: Vec::new(),
        };
        if world == 1 {
            return Ok(ring);
        }
        let succ = (rank + 1) % world;
        let pred = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let next_addr = addrs[succ];
        let (next, prev) = std::thread::scope(|s| {
            let dialer = s.spawn(move || -> Result<TcpStream> {
                let mut wait = Duration::from_millis(10);
                let mut stream = loop {
                    match TcpStream::connect_timeout(&next_addr, timeout) {
                        Ok(st) => break st,
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(
                                "ring: connecting to rank {succ} at {next_addr}: {e}; retrying"
                            );
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_millis(500));
                        }
                        Err(e) => {
                            return Err(anyhow::anyhow!(
                            "ring: cannot connect to rank {succ} at {next_addr} within {:.1}s: {e}",
                            timeout.as_secs_f64()
                        ))
                        }
                    }
                };
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                let mut hello = Vec::with_capacity(HELLO_LEN);
                hello.extend_from_slice(&MAGIC_HELLO.to_le_bytes());
                hello.extend_from_slice(&PROTOCOL.to_le_bytes());
                hello.extend_from_slice(&id.run_tag.to_le_bytes());
                hello.extend_from_slice(&id.generation.to_le_bytes());
                hello.extend_from_slice(&(rank as u32).to_le_bytes());
                hello.extend_from_slice(&(world as u32).to_le_bytes());
                hello.extend_from_slice(&(id.buffer_len as u64).to_le_bytes());
                match gpo_ops::ring_auth::dial(&mut stream, &id.secret, &hello) {
                    Ok(()) => Ok(stream),
                    Err(gpo_ops::ring_auth::RingAuthError::Io(e)) => {
                        Err(io_context(e, "handshake with", succ, timeout))
                    }
                    Err(e) => {
                        failures.record(gpo_ops::auth::reason::RING_HANDSHAKE);
                        tracing::warn!(
                            reason = gpo_ops::auth::reason::RING_HANDSHAKE,
                            "ring: the listener at {next_addr} is not rank {succ} of this run: {e}"
                        );
                        Err(anyhow::anyhow!(
                            "ring: the listener at {next_addr} is not rank {succ} of this run: {e}"
                        ))
                    }
                }
            });
            let prev = accept_pred(listener, pred, world, id, deadline, timeout, failures);
            let next = dialer
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("ring: the dialing thread panicked")));
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        let clones = vec![
            next.try_clone()
                .context("ring: cloning the connection to the successor")?,
            prev.try_clone()
                .context("ring: cloning the connection from the predecessor")?,
        ];
        ring.shared = Arc::new(Shared::new(clones));
        let sender = Sender::spawn(next, ring.shared.clone(), succ, timeout)
            .context("ring: starting the sending thread")?;
        ring.link = Some(Link { prev, sender });
        ring.scratch = vec![0.0; id.buffer_len];
        ring.recv = vec![0.0; SEGMENT.min(id.buffer_len)];
        Ok(ring)
    }

    /// The ring's identity.
    pub fn id(&self) -> RingId {
        self.id
    }

    /// The error of a call that failed: aborted if this rank's aborter was called, else
    /// the first failure either thread saw, else `e`.
    fn failure(&self, e: anyhow::Error) -> anyhow::Error {
        if self.shared.aborted() {
            anyhow::anyhow!(
                "ring: all-reduce call {} of rank {} was aborted (its Aborter was called, so that recovery does not wait on a peer); the collective must be set up again",
                self.calls,
                self.rank
            )
        } else if let Some(why) = self.shared.failure() {
            anyhow::anyhow!(why)
        } else {
            e
        }
    }

    /// The pipelined reduce-scatter and all-gather of `buf` into `self.scratch`.
    ///
    /// Message `i` of `2 (world − 1)` that this rank receives is chunk
    /// `r − 1 − i` (reduce-scatter, `i < world − 1`) or `r − (i − world + 1)` (all-gather);
    /// what it sends is first its own chunk `r`, straight from `buf`, then every received
    /// message but the last, forwarded segment by segment from the scratch buffer.
    fn reduce(&mut self, buf: &[f64]) -> Result<()> {
        let (w, r, len, call) = (self.world, self.rank, self.id.buffer_len, self.calls);
        let pred = (r + w - 1) % w;
        let timeout = self.timeout;
        let link = self.link.as_mut().context("ring: not connected")?;
        let mut tx = Drain {
            sender: &mut link.sender,
            shared: &self.shared,
            done: false,
        };
        let prev = &mut link.prev;
        let recv = &mut self.recv;
        debug_assert_eq!(
            self.scratch.len(),
            len,
            "the scratch buffer has the ring's length"
        );
        // Every access to the scratch buffer below goes through this one pointer, to
        // disjoint segments, so the sending thread's reads of segments handed to it never
        // overlap a write of this thread (see the waits on `sent_end`).
        let base = self.scratch.as_mut_ptr();
        let total = 2 * (w - 1);
        let result = (|| -> Result<()> {
            let mut sent_end = vec![0u64; total];
            for (k, seg) in segments(chunk_range(len, w, r)).enumerate() {
                let h = header(call, 0, r, k, seg.len());
                // SAFETY: `buf` is borrowed for this whole call, is only read, and `tx`
                // drains the sending thread before the call returns (also on errors).
                sent_end[0] = unsafe { tx.sender.push_values(h, &buf[seg])? };
            }
            let mut h = [0u8; HEADER_LEN];
            for i in 0..total {
                let (phase, c) = if i < w - 1 {
                    (0, (r + 2 * w - i - 1) % w)
                } else {
                    (1, (r + w - (i - (w - 1))) % w)
                };
                if phase == 1 && i >= w {
                    // Chunk `c` went out from scratch as message `i − w + 1` (a partial sum);
                    // its final value is about to overwrite it. (The final value cannot
                    // arrive before that send finished, so this waits for nothing in
                    // practice; it makes the rule explicit.)
                    tx.sender.wait(sent_end[i - (w - 1)])?;
                }
                let forward = (i + 1 < total).then_some(if i + 1 < w - 1 { 0 } else { 1 });
                for (k, seg) in segments(chunk_range(len, w, c)).enumerate() {
                    prev.read_exact(&mut h)
                        .map_err(|e| io_context(e, "receiving from", pred, timeout))?;
                    check_header(&h, pred, header(call, phase, c, k, seg.len()))?;
                    // SAFETY: `seg` lies inside the scratch buffer; no other live reference
                    // to it exists, and the sending thread is not reading it (it was never
                    // handed over in this call, or its send was waited for above).
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(base.add(seg.start), seg.len()) };
                    if phase == 0 {
                        let got = &mut recv[..seg.len()];
                        bytes::read_values(prev, got)
                            .map_err(|e| io_context(e, "receiving from", pred, timeout))?;
                        bytes::add_into(dst, &buf[seg.clone()], got);
                    } else {
                        bytes::read_values(prev, dst)
                            .map_err(|e| io_context(e, "receiving from", pred, timeout))?;
                    }
                    if let Some(fp) = forward {
                        let h = header(call, fp, c, k, seg.len());
                        // SAFETY: this segment is not written again in this call unless the
                        // send is waited for first, and `tx` drains before the call returns.
                        sent_end[i + 1] = unsafe { tx.sender.push_values(h, dst)? };
                    }
                    tx.sender.poll()?;
                }
            }
            let last = tx.sender.issued();
            tx.sender.wait(last)
        })();
        match &result {
            Ok(()) => tx.done = true,
            // Recorded before the guard shuts the streams, so that the sending thread's
            // failure that the shutdown causes is not taken for the cause.
            Err(e) if !self.shared.aborted() => self.shared.fail(format!("{e:#}")),
            Err(_) => {}
        }
        result
    }
}

/// Waits for the sending thread on every way out of [`TcpRing::reduce`], so no borrowed
/// payload outlives the call; on a failure it first shuts the streams, so the wait is short.
struct Drain<'a> {
    sender: &'a mut Sender,
    shared: &'a Shared,
    done: bool,
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.shutdown();
        }
        self.sender.drain();
    }
}

fn accept_pred(
    listener: &TcpListener,
    pred: usize,
    world: usize,
    id: RingId,
    deadline: Instant,
    timeout: Duration,
    failures: &gpo_ops::auth::AuthFailures,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let (stream, h) = loop {
        match listener.accept() {
            Ok((s, peer)) => match authenticate(s, id, timeout) {
                Ok(x) => break x,
                Err(e) => {
                    // A stranger (or a member of another run): refuse it and keep waiting
                    // for the real predecessor.
                    failures.record(gpo_ops::auth::reason::RING_HANDSHAKE);
                    tracing::warn!(
                        reason = gpo_ops::auth::reason::RING_HANDSHAKE,
                        %peer,
                        "ring: refused a connection that did not prove it is rank {pred} of this run: {e}"
                    );
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "ring: rank {pred} did not connect within {:.1}s",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => bail!("ring: accepting rank {pred}: {e}"),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let word = |a: usize| u32::from_le_bytes(h[a..a + 4].try_into().unwrap());
    let long = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().unwrap());
    if word(0) != MAGIC_HELLO || word(4) != PROTOCOL {
        bail!("ring: the peer that connected is not a gpo ring member of protocol {PROTOCOL}");
    }
    if long(8) != id.run_tag {
        bail!("ring: the peer that connected belongs to another run (wrong run id)");
    }
    if long(16) != id.generation {
        bail!(
            "ring: the peer that connected is in generation {}, this ring is generation {} (stale generation)",
            long(16),
            id.generation
        );
    }
    if word(24) as usize != pred || word(28) as usize != world {
        bail!(
            "ring: expected rank {pred} of {world}, rank {} of {} connected",
            word(24),
            word(28)
        );
    }
    if long(32) as usize != id.buffer_len {
        bail!(
            "ring: rank {pred} reduces buffers of {} values, this rank {} (wrong buffer size)",
            long(32),
            id.buffer_len
        );
    }
    Ok(stream)
}

/// The acceptor's side of the handshake on one accepted connection: the peer's hello,
/// once the peer has proven it knows the ring secret.
fn authenticate(
    mut stream: TcpStream,
    id: RingId,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), gpo_ops::ring_auth::RingAuthError> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let t = Some(timeout.min(HANDSHAKE_TIMEOUT));
    stream.set_read_timeout(t)?;
    stream.set_write_timeout(t)?;
    let h = gpo_ops::ring_auth::accept(&mut stream, &id.secret, HELLO_LEN)?;
    Ok((stream, h))
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn bytes_sent(&self) -> u64 {
        self.shared.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn all_reduce_sum(&mut self, buf: &mut [f64]) -> Result<()> {
        if buf.len() != self.id.buffer_len {
            bail!(
                "ring: asked to reduce {} values, the ring was set up for {} (wrong buffer size)",
                buf.len(),
                self.id.buffer_len
            );
        }
        if self.shared.aborted() {
            return Err(self.failure(anyhow::anyhow!("aborted")));
        }
        if let Some(why) = &self.broken {
            bail!("ring: unusable after an earlier failure ({why}); the collective must be set up again");
        }
        if self.world == 1 {
            return Ok(());
        }
        self.calls += 1;
        match self.reduce(buf) {
            Ok(()) => {
                buf.copy_from_slice(&self.scratch);
                Ok(())
            }
            Err(e) => {
                let e = self.failure(e);
                self.shared.fail(format!("{e:#}"));
                self.broken = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    fn aborter(&self) -> Aborter {
        let shared = self.shared.clone();
        Aborter::new(move || shared.abort())
    }
}

impl Drop for TcpRing {
    /// Closes both connections even while an [`Aborter`] (which holds clones) lives on, so
    /// the neighbours see this member leave at once.
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}
