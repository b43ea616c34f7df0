//! Lets a step's last running shard hand pieces of its work to threads that have none left.
//!
//! A step's gradient runs in fixed shards, one a thread ([`crate::grad`]). Equal shards do
//! not finish together: on the 2-vCPU machines measured, two of them finished 5.9 % apart on
//! average (BENCHMARKS.md), and the faster thread then idled. While fewer shards run than
//! the pool has threads, the fused ops cut their work in two with `rayon::join` so that an
//! idle thread can take one half: a product's output rows ([`split`]), or an attention
//! layer's groups ([`for_each`]).
//!
//! Every piece writes its own outputs and computes each value exactly as the whole op
//! would (a product's row of output is the same sum, in the same order, whichever rows are
//! computed with it), so a step's result does not depend on whether, where or when its ops
//! were cut: the tests in `tape::tests` compare cut and uncut gradients bit for bit.
//!
//! A shard enters its [`Balance`] on its thread ([`Balance::run`]); pieces that another
//! thread takes run outside it and are not cut again. No clock and no I/O: the decision
//! reads one counter.

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The shards of one step still running, against the threads they run on.
#[derive(Debug)]
pub struct Balance {
    running: AtomicUsize,
    threads: usize,
    /// Cut whether or not a thread is idle (tests: every cut path runs).
    always: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Balance>>> = const { RefCell::new(None) };
}

impl Balance {
    /// A step of `shards` shards on a pool of `threads` threads.
    pub fn new(shards: usize, threads: usize) -> Arc<Self> {
        Arc::new(Balance {
            running: AtomicUsize::new(shards),
            threads,
            always: false,
        })
    }

    /// A balance under which every op that can be cut is cut, idle thread or not: the
    /// tests' way to run each cut path on any machine.
    pub fn always() -> Arc<Self> {
        Arc::new(Balance {
            running: AtomicUsize::new(usize::MAX),
            threads: 0,
            always: true,
        })
    }

    /// Runs one shard `f` on this thread under the balance, then counts the shard done
    /// (also when `f` panics).
    pub fn run<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        struct Exit<'a>(&'a Balance, Option<Arc<Balance>>);
        impl Drop for Exit<'_> {
            fn drop(&mut self) {
                CURRENT.with(|c| *c.borrow_mut() = self.1.take());
                self.0.running.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let before = CURRENT.with(|c| c.borrow_mut().replace(Arc::clone(self)));
        let _exit = Exit(self, before);
        f()
    }

    fn idle(&self) -> bool {
        self.always || self.running.load(Ordering::Acquire) < self.threads
    }
}

/// Whether this thread runs a shard while another thread of its step has none left.
pub(crate) fn idle_thread() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|b| b.idle()))
}

/// `(a(), b())`, on two threads when another one is idle ([`idle_thread`]), else in turn.
pub(crate) fn split<RA: Send, RB: Send>(
    a: impl FnOnce() -> RA + Send,
    b: impl FnOnce() -> RB + Send,
) -> (RA, RB) {
    if idle_thread() {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// `f` on every item, spread over the pool when another thread is idle, else in order.
pub(crate) fn for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync + Send) {
    if items.len() > 1 && idle_thread() {
        items.into_par_iter().with_max_len(1).for_each(f);
    } else {
        items.into_iter().for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_idle_only_while_fewer_shards_run_than_threads() {
        assert!(!idle_thread(), "outside any step nothing is cut");
        let b = Balance::new(2, 2);
        b.run(|| assert!(!idle_thread(), "two shards on two threads: no thread idle"));
        b.run(|| assert!(idle_thread(), "the last shard runs while a thread idles"));
        assert!(!idle_thread(), "the balance ends with its shard");
        Balance::always().run(|| assert!(idle_thread()));
    }

    #[test]
    fn a_panicking_shard_still_leaves_its_balance() {
        let b = Balance::new(3, 2);
        let r = std::panic::catch_unwind(|| b.run(|| panic!("shard failed")));
        assert!(r.is_err());
        assert!(!idle_thread());
        assert_eq!(b.running.load(Ordering::Acquire), 2);
    }
}
