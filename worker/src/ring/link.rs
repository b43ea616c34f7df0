//! The two connections of one ring member and what may break them: the persistent sending
//! thread, the state an [`crate::collective::Aborter`] shares with the ring, and the
//! wording of every way a transfer can fail.
//!
//! The ring sends and receives at the same time (otherwise two neighbours could both block
//! writing into full socket buffers). Receiving and adding run on the caller's thread; one
//! sending thread per ring, started at connect, writes what the caller hands it, in order,
//! and acknowledges each piece. Handing it a borrowed slice instead of a copy is what keeps
//! the sent bytes free of any extra pass; the price is the contract on [`Sender::push`].

use super::HEADER_LEN;
use std::io::{IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What the ring, its sending thread and its aborters share.
pub(crate) struct Shared {
    aborted: AtomicBool,
    /// The first failure seen by either thread (later ones are its consequences).
    failure: Mutex<Option<String>>,
    /// Clones of the ring's two streams, so they can be shut down from any thread.
    streams: Vec<TcpStream>,
    /// Bytes written to the successor (headers and values), for the metrics.
    pub(crate) sent: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub(crate) fn new(streams: Vec<TcpStream>) -> Shared {
        Shared {
            aborted: AtomicBool::new(false),
            failure: Mutex::new(None),
            sent: std::sync::atomic::AtomicU64::new(0),
            streams,
        }
    }

    /// Marks the ring aborted and shuts both streams down: a blocked read or write returns
    /// at once, and the neighbours see the connections close.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.shutdown();
    }

    pub(crate) fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// Records `why` unless an earlier failure is recorded, then shuts both streams down so
    /// that the other thread stops too and the neighbours learn of it at once.
    pub(crate) fn fail(&self, why: String) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(why);
            }
        }
        self.shutdown();
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn shutdown(&self) {
        for s in &self.streams {
            // Already shut down or reset by the peer: nothing left to do either way.
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// How an I/O error of a transfer with rank `peer` reads to a person. A closed or reset
/// connection is a peer failure; that this rank itself was aborted is told apart by the
/// caller (the abort flag), since a shut-down socket looks the same from inside.
pub(crate) fn io_failure(e: &std::io::Error, what: &str, peer: usize, timeout: Duration) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::WouldBlock | K::TimedOut => format!(
            "ring: {what} rank {peer} timed out after {:.1}s",
            timeout.as_secs_f64()
        ),
        K::UnexpectedEof => {
            format!("ring: rank {peer} closed the connection while this rank was {what} it (peer failure)")
        }
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted | K::NotConnected => {
            format!("ring: {what} rank {peer} failed, the connection was closed or reset: {e} (peer failure)")
        }
        _ => format!("ring: {what} rank {peer} failed: {e}"),
    }
}

/// One piece for the sending thread: a header and the bytes that follow it.
struct Job {
    header: [u8; HEADER_LEN],
    ptr: *const u8,
    len: usize,
    /// Where the payload is an encoded copy (big-endian targets), the copy itself;
    /// `ptr` points into its heap buffer, which moving the `Vec` does not move.
    _owned: Vec<u8>,
}

// SAFETY: the pointer is only read, by the sending thread, while the pushing thread keeps
// the memory alive and unmodified (the contract of `Sender::push`).
unsafe impl Send for Job {}

/// The persistent sending thread of one ring member.
pub(crate) struct Sender {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    issued: u64,
    acked: u64,
    shared: Arc<Shared>,
}

impl Sender {
    /// Starts the thread that owns `stream` (the connection to rank `succ`).
    pub(crate) fn spawn(
        mut stream: TcpStream,
        shared: Arc<Shared>,
        succ: usize,
        timeout: Duration,
    ) -> std::io::Result<Sender> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel::<bool>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ring-send-{succ}"))
            .spawn(move || {
                let mut failed = false;
                while let Ok(job) = rx.recv() {
                    if !failed {
                        // SAFETY: `Sender::push`'s contract keeps the bytes alive and
                        // unmodified until this job is acknowledged below.
                        let payload = unsafe { std::slice::from_raw_parts(job.ptr, job.len) };
                        match write_both(&mut stream, &job.header, payload) {
                            Ok(()) => {
                                let n = (job.header.len() + payload.len()) as u64;
                                sh.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed = true;
                                sh.fail(io_failure(&e, "sending to", succ, timeout));
                            }
                        }
                    }
                    if tx.send(!failed).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Sender {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            issued: 0,
            acked: 0,
            shared,
        })
    }

    /// Queues `header` then `payload` for sending; returns the piece's sequence number.
    ///
    /// # Safety
    /// `payload` must stay alive and must not be written by anyone until [`Sender::wait`]
    /// for the returned number, or [`Sender::drain`], has returned.
    pub(crate) unsafe fn push(
        &mut self,
        header: [u8; HEADER_LEN],
        payload: &[u8],
    ) -> anyhow::Result<u64> {
        self.queue(Job {
            header,
            ptr: payload.as_ptr(),
            len: payload.len(),
            _owned: Vec::new(),
        })
    }

    /// Queues `header` then the wire form of `values` (see [`Sender::push`]'s contract,
    /// which applies to `values`).
    ///
    /// # Safety
    /// As for [`Sender::push`].
    pub(crate) unsafe fn push_values(
        &mut self,
        header: [u8; HEADER_LEN],
        values: &[f64],
    ) -> anyhow::Result<u64> {
        #[cfg(target_endian = "little")]
        {
            self.push(header, super::bytes::wire_view(values))
        }
        #[cfg(target_endian = "big")]
        {
            let mut owned = Vec::new();
            super::bytes::encode(values, &mut owned);
            self.queue(Job {
                header,
                ptr: owned.as_ptr(),
                len: owned.len(),
                _owned: owned,
            })
        }
    }

    /// The number of pieces queued so far (the sequence number of the latest).
    pub(crate) fn issued(&self) -> u64 {
        self.issued
    }

    fn queue(&mut self, job: Job) -> anyhow::Result<u64> {
        let jobs = self.jobs.as_ref().ok_or_else(|| self.gone())?;
        jobs.send(job).map_err(|_| self.gone())?;
        self.issued += 1;
        Ok(self.issued)
    }

    fn gone(&self) -> anyhow::Error {
        anyhow::anyhow!("ring: the sending thread has stopped")
    }

    fn ack(&mut self, ok: bool) -> anyhow::Result<()> {
        self.acked += 1;
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!(self
                .shared
                .failure()
                .unwrap_or_else(|| "ring: sending failed".into())))
        }
    }

    /// Blocks until piece `seq` (and all before it) has been handed to the kernel.
    pub(crate) fn wait(&mut self, seq: u64) -> anyhow::Result<()> {
        while self.acked < seq {
            let ok = self.done.recv().map_err(|_| self.gone())?;
            self.ack(ok)?;
        }
        Ok(())
    }

    /// Takes note of pieces already sent, without blocking; fails if one could not be sent.
    pub(crate) fn poll(&mut self) -> anyhow::Result<()> {
        while let Ok(ok) = self.done.try_recv() {
            self.ack(ok)?;
        }
        Ok(())
    }

    /// Waits for every queued piece, sent or failed: afterwards no borrowed payload is in use.
    pub(crate) fn drain(&mut self) {
        while self.acked < self.issued {
            match self.done.recv() {
                Ok(_) => self.acked += 1,
                // The thread is gone, so it reads nothing any more.
                Err(_) => break,
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.drain();
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `a` then `b` with as few system calls as the kernel allows.
fn write_both(s: &mut TcpStream, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
