//! `gpo`: one binary for every role of the system — data generation, training,
//! evaluation, inspection and benchmarks. Each subcommand lives in its own module under
//! [`cmd`]; [`inputs`] is the I/O edge that turns paths into surveys and features.

mod cmd;
mod embedding;
mod experiment;
mod inputs;
mod signals;
mod sweep;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gpo",
    version,
    about = "Group Preference Optimization: few-shot alignment of LLMs to groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the seeded synthetic survey and its embedding store.
    Synth(cmd::synth::Args),
    /// Embed a dataset's (question, option) texts with a real model into an embedding store.
    Embed(cmd::embed::Args),
    /// Meta-train GPO and report alignment on held-out groups.
    Train(cmd::train::Args),
    /// Run the paper's protocol (splits × seeds, baselines, few-shot curve) and write a report.
    Experiment(cmd::experiment::Args),
    /// Evaluate a checkpoint on its run's held-out groups.
    Eval(cmd::eval::Args),
    /// Print the module's configuration and parameter count.
    ModelInfo(cmd::model_info::Args),
    /// Print the GPO loss of one batch under a checkpoint's weights.
    Loss(cmd::loss::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
    /// Serve a distributed run: workers register, steps are dispatched to them.
    Coordinator(Box<cmd::coordinator::Args>),
    /// Join a distributed run as a worker.
    Worker(cmd::worker::Args),
    /// Show a coordinator's run: step, generation, workers, recent step times.
    Status(cmd::status::Args),
    /// Serve few-shot Predict and Rerank for groups over HTTP/JSON and gRPC.
    Serve(cmd::serve::Args),
    /// Run a sweep of trials on a pool of workers, with early stopping and a leaderboard.
    Sweep(cmd::sweep::Args),
    /// Run every GPU check and write one JSON of results (a build with `--features cuda`).
    GpuCheck(cmd::gpu_check::Args),
}

/// Keeps freed tensor buffers in the heap instead of returning them to the kernel: candle
/// allocates fresh buffers for every op, and with glibc's defaults each large one is an
/// mmap/munmap pair whose page faults cost more than 10% of a training step.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator thresholds; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    tune_allocator();
    gpo_core::grad::shard_threads_not_kernels();
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Train(a) => a.log_format,
        Command::Coordinator(a) => a.train.log_format,
        Command::Worker(a) => a.log_format,
        _ => gpo_ops::logs::LogFormat::Text,
    };
    gpo_ops::logs::init(log_format, "warn");
    let result = match cli.command {
        Command::Synth(a) => cmd::synth::run(a),
        Command::Embed(a) => cmd::embed::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Experiment(a) => cmd::experiment::run(a),
        Command::ModelInfo(a) => cmd::model_info::run(a),
        Command::Loss(a) => cmd::loss::run(a),
        Command::Bench(b) => cmd::bench::run(b),
        Command::Coordinator(a) => cmd::coordinator::run(*a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Sweep(a) => cmd::sweep::run(a),
        Command::GpuCheck(a) => cmd::gpu_check::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
