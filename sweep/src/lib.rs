//! Sweeps of gpo runs: many trials over groups, splits, seeds and hyperparameters, run on a
//! pool of workers.
//!
//! Why it exists: a platform team's main use of gpo is not one run but hundreds, and a sweep
//! needs rules that no single run has — which trial runs next, on which workers, which trial
//! is not worth finishing, and what survives when the sweep's own process dies. Those rules
//! live here as pure logic (no I/O, no clock, no threads), so they are tested exhaustively
//! and shared by every way of running trials (`gpo sweep` on worker processes, the overhead
//! benchmark on simulated workers):
//!
//! - [`spec`]: the `sweep.toml` file and the trials it expands to (grid or random search);
//! - [`space`]: the search space's dimensions and the seeded draws of random search;
//! - [`schedule`]: the gang scheduler, a state machine fed events and answering actions;
//! - [`stopping`]: early stopping (ASHA and the median rule) on evaluation scores;
//! - [`record`]: a trial's on-disk record, one small file per trial, and the sweep's resume;
//! - [`leaderboard`]: the ranking, as CSV and Markdown.

pub mod leaderboard;
pub mod record;
pub mod schedule;
pub mod space;
pub mod spec;
pub mod stopping;
