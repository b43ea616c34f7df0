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
//! sender's rank and the buffer length; every message carries a header naming the call, the
//! phase and the chunk. A mismatch is a clear error. Every read and write has a timeout.
//! The reduction runs on a scratch copy, so a failed all-reduce leaves the caller's buffer
//! as it was; the ring is then unusable (its streams are out of step) and must be re-formed.

use crate::collective::Collective;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MAGIC_HELLO: u32 = 0x4750_4f52; // "GPOR"
const MAGIC_CHUNK: u32 = 0x4750_4f43; // "GPOC"
const PROTOCOL: u32 = 1;
const HELLO_LEN: usize = 4 + 4 + 8 + 8 + 4 + 4 + 8;
const HEADER_LEN: usize = 4 + 8 + 4 + 4 + 8;

/// What identifies one ring: every member must agree on all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingId {
    /// A 64-bit tag of the run id ([`run_tag`]).
    pub run_tag: u64,
    /// The membership generation.
    pub generation: u64,
    /// Length in f64 values of the buffer every call reduces.
    pub buffer_len: usize,
}

/// A 64-bit tag of a run id (FNV-1a), carried in every ring handshake.
pub fn run_tag(run_id: &str) -> u64 {
    run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One member of a TCP ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    id: RingId,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    calls: u64,
    broken: Option<String>,
    scratch: Vec<f64>,
    send_bytes: Vec<u8>,
    recv_bytes: Vec<u8>,
}

/// The chunk boundaries of a buffer of `len` values cut into `world` nearly equal parts.
fn chunk_range(len: usize, world: usize, c: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

fn encode(src: &[f64], dst: &mut Vec<u8>) {
    dst.clear();
    dst.reserve(src.len() * 8);
    for v in src {
        dst.extend_from_slice(&v.to_le_bytes());
    }
}

fn io_context(e: std::io::Error, what: &str, peer: usize, timeout: Duration) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
            "ring: {what} rank {peer} timed out after {:.1}s",
            timeout.as_secs_f64()
        ),
        _ => anyhow::anyhow!("ring: {what} rank {peer} failed: {e}"),
    }
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
        let world = addrs.len();
        if rank >= world {
            bail!("ring: rank {rank} is outside a world of {world}");
        }
        let mut ring = TcpRing {
            rank,
            world,
            id,
            next: None,
            prev: None,
            calls: 0,
            broken: None,
            scratch: Vec::new(),
            send_bytes: Vec::new(),
            recv_bytes: Vec::new(),
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
                stream
                    .write_all(&hello)
                    .map_err(|e| io_context(e, "handshake with", succ, timeout))?;
                Ok(stream)
            });
            let prev = accept_pred(listener, pred, world, id, deadline, timeout);
            let next = dialer
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("ring: the dialing thread panicked")));
            (next, prev)
        });
        ring.next = Some(next?);
        ring.prev = Some(prev?);
        Ok(ring)
    }

    /// The ring's identity.
    pub fn id(&self) -> RingId {
        self.id
    }

    fn exchange(&mut self, phase: u32, send_c: usize, recv_c: usize, add: bool) -> Result<()> {
        let timeout = self.timeout();
        let (succ, pred) = (
            (self.rank + 1) % self.world,
            (self.rank + self.world - 1) % self.world,
        );
        let send_r = chunk_range(self.id.buffer_len, self.world, send_c);
        let recv_r = chunk_range(self.id.buffer_len, self.world, recv_c);
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC_CHUNK.to_le_bytes());
        header[4..12].copy_from_slice(&self.calls.to_le_bytes());
        header[12..16].copy_from_slice(&phase.to_le_bytes());
        header[16..20].copy_from_slice(&(send_c as u32).to_le_bytes());
        header[20..28].copy_from_slice(&(send_r.len() as u64).to_le_bytes());
        let mut send_bytes = std::mem::take(&mut self.send_bytes);
        encode(&self.scratch[send_r], &mut send_bytes);
        let next = self.next.as_mut().context("ring: not connected")?;
        let prev = self.prev.as_mut().context("ring: not connected")?;
        let recv_bytes = &mut self.recv_bytes;
        let calls = self.calls;
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(|| -> Result<()> {
                next.write_all(&header)
                    .and_then(|_| next.write_all(&send_bytes))
                    .map_err(|e| io_context(e, "sending to", succ, timeout))
            });
            let received = (|| -> Result<()> {
                let mut h = [0u8; HEADER_LEN];
                prev.read_exact(&mut h)
                    .map_err(|e| io_context(e, "receiving from", pred, timeout))?;
                let word = |a: usize| u32::from_le_bytes(h[a..a + 4].try_into().unwrap());
                let long = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().unwrap());
                if word(0) != MAGIC_CHUNK {
                    bail!("ring: rank {pred} sent something that is not a chunk");
                }
                if long(4) != calls || word(12) != phase || word(16) as usize != recv_c {
                    bail!(
                        "ring: rank {pred} is out of step: it sent call {} phase {} chunk {}, expected call {calls} phase {phase} chunk {recv_c}",
                        long(4),
                        word(12),
                        word(16)
                    );
                }
                if long(20) as usize != recv_r.len() {
                    bail!(
                        "ring: rank {pred} sent a chunk of {} values, expected {} (buffer sizes differ)",
                        long(20),
                        recv_r.len()
                    );
                }
                recv_bytes.resize(recv_r.len() * 8, 0);
                prev.read_exact(recv_bytes)
                    .map_err(|e| io_context(e, "receiving from", pred, timeout))
            })();
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("ring: the sending thread panicked")));
            (sent, received)
        });
        self.send_bytes = send_bytes;
        sent?;
        received?;
        let dst = &mut self.scratch[recv_r];
        for (d, b) in dst.iter_mut().zip(self.recv_bytes.chunks_exact(8)) {
            let v = f64::from_le_bytes(b.try_into().unwrap());
            if add {
                *d += v;
            } else {
                *d = v;
            }
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.next
            .as_ref()
            .and_then(|s| s.read_timeout().ok().flatten())
            .unwrap_or(Duration::from_secs(30))
    }

    fn reduce(&mut self) -> Result<()> {
        let (w, r) = (self.world, self.rank);
        for s in 0..w - 1 {
            self.exchange(0, (r + w - s) % w, (r + 2 * w - s - 1) % w, true)?;
        }
        for s in 0..w - 1 {
            self.exchange(1, (r + 1 + w - s) % w, (r + w - s) % w, false)?;
        }
        Ok(())
    }
}

fn accept_pred(
    listener: &TcpListener,
    pred: usize,
    world: usize,
    id: RingId,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
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
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut h = [0u8; HELLO_LEN];
    (&stream)
        .read_exact(&mut h)
        .map_err(|e| io_context(e, "handshake with", pred, timeout))?;
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

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f64]) -> Result<()> {
        if buf.len() != self.id.buffer_len {
            bail!(
                "ring: asked to reduce {} values, the ring was set up for {} (wrong buffer size)",
                buf.len(),
                self.id.buffer_len
            );
        }
        if let Some(why) = &self.broken {
            bail!("ring: unusable after an earlier failure ({why}); the collective must be set up again");
        }
        if self.world == 1 {
            return Ok(());
        }
        self.calls += 1;
        self.scratch.clear();
        self.scratch.extend_from_slice(buf);
        match self.reduce() {
            Ok(()) => {
                buf.copy_from_slice(&self.scratch);
                Ok(())
            }
            Err(e) => {
                self.broken = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(
        world: usize,
        ids: impl Fn(usize) -> RingId,
        timeout: Duration,
    ) -> Vec<Result<TcpRing>> {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        std::thread::scope(|s| {
            let hs: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = &addrs;
                    let id = ids(r);
                    s.spawn(move || TcpRing::connect(r, addrs, l, id, timeout))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn id(len: usize) -> RingId {
        RingId {
            run_tag: run_tag("run"),
            generation: 1,
            buffer_len: len,
        }
    }

    #[test]
    fn chunks_cover_the_buffer() {
        for len in [0, 1, 5, 7, 100] {
            for w in 1..6 {
                let mut next = 0;
                for c in 0..w {
                    let r = chunk_range(len, w, c);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn every_rank_gets_the_same_exact_sum() {
        for world in [1, 2, 3, 4] {
            for len in [1usize, 2, 7, 1000] {
                let rings = ring_of(world, |_| id(len), Duration::from_secs(10));
                let results: Vec<Vec<f64>> = std::thread::scope(|s| {
                    let hs: Vec<_> = rings
                        .into_iter()
                        .enumerate()
                        .map(|(r, ring)| {
                            s.spawn(move || {
                                let mut ring = ring.unwrap();
                                let mut buf: Vec<f64> =
                                    (0..len).map(|i| (i * 10 + r) as f64 * 0.5).collect();
                                for _ in 0..3 {
                                    ring.all_reduce_sum(&mut buf).unwrap();
                                }
                                buf
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                // Three successive sums: world² · x after 2 more rounds → world³ · base.
                for (i, v) in results[0].iter().enumerate() {
                    let once: f64 = (0..world).map(|r| (i * 10 + r) as f64 * 0.5).sum();
                    let expect = once * (world * world) as f64;
                    assert!(
                        (v - expect).abs() <= 1e-4 * expect.abs().max(1.0),
                        "{v} vs {expect}"
                    );
                }
                for r in &results {
                    assert_eq!(r, &results[0], "ranks agree bitwise");
                }
            }
        }
    }

    #[test]
    fn wrong_buffer_size_is_rejected_and_leaves_the_buffer_alone() {
        // At setup: a peer that announces another length.
        let rings = ring_of(
            2,
            |r| id(if r == 0 { 10 } else { 11 }),
            Duration::from_secs(5),
        );
        let errs: Vec<String> = rings
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("wrong buffer size")),
            "{errs:?}"
        );
        // At call time: a buffer of another length than the ring's.
        let mut rings = ring_of(1, |_| id(4), Duration::from_secs(5));
        let mut ring = rings.pop().unwrap().unwrap();
        let mut buf = vec![1.0f64; 5];
        let e = ring.all_reduce_sum(&mut buf).unwrap_err();
        assert!(format!("{e}").contains("wrong buffer size"));
        assert_eq!(buf, vec![1.0; 5]);
    }

    #[test]
    fn stale_generation_and_other_runs_are_rejected() {
        let rings = ring_of(
            2,
            |r| RingId {
                generation: if r == 0 { 2 } else { 1 },
                ..id(8)
            },
            Duration::from_secs(5),
        );
        let errs: Vec<String> = rings
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("stale generation")),
            "{errs:?}"
        );
        let rings = ring_of(
            2,
            |r| RingId {
                run_tag: run_tag(if r == 0 { "a" } else { "b" }),
                ..id(8)
            },
            Duration::from_secs(5),
        );
        let errs: Vec<String> = rings
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        assert!(errs.iter().any(|e| e.contains("wrong run id")), "{errs:?}");
    }

    #[test]
    fn a_silent_peer_times_out_and_the_buffer_is_unchanged() {
        let rings = ring_of(2, |_| id(16), Duration::from_millis(300));
        let mut rings: Vec<TcpRing> = rings.into_iter().map(|r| r.unwrap()).collect();
        let _silent = rings.pop().unwrap();
        let mut ring = rings.pop().unwrap();
        let mut buf = vec![3.0f64; 16];
        let t = Instant::now();
        let e = ring.all_reduce_sum(&mut buf).unwrap_err();
        assert!(format!("{e:#}").contains("timed out"), "{e:#}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(buf, vec![3.0; 16]);
        let again = ring.all_reduce_sum(&mut buf).unwrap_err();
        assert!(format!("{again:#}").contains("unusable"), "{again:#}");
    }
}
