//! The tape's buffers: reused from a per-thread free list instead of freshly allocated and
//! zeroed, since zeroing and first-touch page faults of the step's activations were about a
//! twentieth of the step (`perf`, BENCHMARKS.md). A reused buffer holds an earlier step's
//! values, so every user writes all of it before reading it ([`buf`]).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// At most this many free buffers are kept per thread (a step uses about ten per layer).
const KEEP: usize = 256;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `n` values borrowed from this thread's free list, returned to it on drop.
#[derive(Default)]
pub(super) struct Buf {
    v: Vec<f32>,
    n: usize,
}

/// A buffer of `n` values whose contents are unspecified (an earlier step's): the caller
/// overwrites every value before reading any.
pub(super) fn buf(n: usize) -> Buf {
    let reused = FREE.with(|f| {
        let mut f = f.borrow_mut();
        // The smallest free buffer that fits, so large ones stay for large uses; of equal
        // ones the last freed, whose lines the caches are likeliest still to hold (a step's
        // memory is several times the L3, so the first freed is cold). The list stays in
        // the order buffers were freed.
        let best = f
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, v)| v.len() >= n)
            .min_by_key(|(_, v)| v.len())
            .map(|(i, _)| i);
        best.map(|i| f.remove(i))
    });
    Buf {
        v: reused.unwrap_or_else(|| vec![0f32; n]),
        n,
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[..self.n]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[..self.n]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        if v.is_empty() {
            return;
        }
        // A thread being torn down has no free list left; the buffer is then just freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let ptr = {
            let mut b = buf(1000);
            b.fill(7.0);
            b.as_ptr()
        };
        // The same allocation comes back for a request that fits, with its old values.
        let b = buf(900);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 900);
        assert!(b.iter().all(|&x| x == 7.0));
    }

    #[test]
    fn of_equal_buffers_the_last_freed_comes_back_first() {
        let (a, b) = (buf(4096), buf(4096));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        drop(a);
        drop(b);
        // `b` was freed last: it comes back first, then `a`, though both fit.
        let first = buf(4096);
        assert_eq!(first.as_ptr(), pb);
        let second = buf(4000);
        assert_eq!(second.as_ptr(), pa);
    }
}
