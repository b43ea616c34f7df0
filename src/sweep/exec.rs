//! How a sweep's trials run: the [`Executor`] trait and its two implementations.
//!
//! Why it exists: the sweep loop must not care whether a trial is a real `gpo train` on a
//! gang of worker processes or a fixed sleep (the overhead benchmark's simulated workers);
//! both report through the same [`Msg`]s on a channel, so the loop wakes the moment
//! anything happens and the benchmark measures the real loop.
//!
//! - [`Processes`]: each trial is a `gpo train` child process — in process for a gang of 1,
//!   `--workers N` (a coordinator and N worker processes all-reducing over the TCP ring)
//!   for a gang of N — following its `--events` file. A child gets SIGUSR1 when the sweep's
//!   process dies (`PR_SET_PDEATHSIG`; see `crate::signals` for why not SIGTERM), so it
//!   writes a resume point and the resumed sweep continues it; stopping a trial early is a
//!   SIGTERM.
//! - [`Sleep`]: each trial sleeps, then reports a score.

use anyhow::Result;
use std::collections::HashMap;
use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One trial run to start.
#[derive(Debug, Clone)]
pub struct Job {
    /// Trial index.
    pub trial: usize,
    /// `DIR/trials/<id>`.
    pub dir: PathBuf,
    /// Its run configuration.
    pub config: toml::Table,
    /// Steps it runs.
    pub steps: u64,
    /// Its gang (worker indices of the pool).
    pub gang: Vec<usize>,
    /// Continue from its checkpoints.
    pub resume: bool,
    /// `--data` (none: the synthetic survey).
    pub data: Option<String>,
    /// `--format`.
    pub format: Option<String>,
    /// `--embeddings`.
    pub embeddings: Option<PathBuf>,
}

/// What a run that ended to its last step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialResult {
    /// GPO's test alignment at the selected checkpoint.
    pub test: f64,
    /// GPO's validation alignment there (`selection = "validation"`).
    pub validation: Option<f64>,
    /// The selected checkpoint's step.
    pub best_step: u64,
    /// Steps run.
    pub steps_run: u64,
}

/// What a trial run tells the sweep loop.
#[derive(Debug, Clone)]
pub enum Msg {
    /// An evaluation.
    Eval {
        /// Trial index.
        trial: usize,
        /// Step.
        step: u64,
        /// GPO's test alignment.
        test: f64,
        /// GPO's validation alignment.
        validation: Option<f64>,
    },
    /// The run ended: `Ok(Some)` at its last step, `Ok(None)` stopped when asked, `Err`
    /// failed (the message says why).
    Ended {
        /// Trial index.
        trial: usize,
        /// Its outcome.
        result: Result<Option<TrialResult>, String>,
    },
    /// A worker joined the pool (connection `conn`); its assignments go to `assign`.
    Joined {
        /// The pool connection.
        conn: u64,
        /// The worker's name.
        name: String,
        /// Where its assignments go.
        assign: super::pool::AssignTx,
    },
    /// A pool connection ended.
    Left {
        /// The pool connection.
        conn: u64,
    },
}

/// Running children by trial.
pub type Pids = Arc<Mutex<HashMap<usize, u32>>>;

/// Sends SIGTERM to a trial's child: it stops at the next step with a resume point.
pub fn signal(pids: &Pids, trial: usize) {
    if let Some(pid) = pids.lock().unwrap_or_else(|p| p.into_inner()).get(&trial) {
        // SAFETY: kill(2) on a pid this process started and has not reaped.
        unsafe {
            libc::kill(*pid as i32, libc::SIGTERM);
        }
    }
}

/// What a trial's child process is.
pub enum Mode {
    /// `gpo train` (`--workers N` for a gang of N: worker processes it starts itself).
    Train,
    /// `gpo coordinator` for a gang lent from the sweep's pool.
    Coordinator {
        /// Where it listens.
        listen: std::net::SocketAddr,
        /// Where it writes its address.
        addr_file: PathBuf,
        /// Its credential flags (`--token-file`, `--tls-*`).
        credentials: Vec<std::ffi::OsString>,
        /// Called with its port once it listens: lends the gang to it.
        on_listening: Box<dyn FnOnce(u16) + Send>,
    },
}

/// Runs trials.
pub trait Executor {
    /// Starts a run; its messages go to `tx`, ending with exactly one [`Msg::Ended`].
    fn start(&mut self, job: Job, tx: Sender<Msg>);
    /// Asks a running trial to stop early (it keeps its best checkpoint).
    fn stop(&mut self, trial: usize);
    /// A pool worker joined as worker `worker` of the scheduler.
    fn joined(&mut self, _worker: usize, _name: String, _assign: super::pool::AssignTx) {}
    /// Pool worker `worker` left.
    fn left(&mut self, _worker: usize) {}
    /// The sweep is over.
    fn close(&mut self) {}
}

/// Trials as `gpo train` child processes.
pub struct Processes {
    exe: PathBuf,
    threads: usize,
    pids: Pids,
}

impl Processes {
    /// Runs `exe train`; an in-process trial computes on `threads` cores.
    pub fn new(exe: PathBuf, threads: usize) -> Self {
        Processes {
            exe,
            threads: threads.max(1),
            pids: Arc::default(),
        }
    }
}

/// Reads `summary.json` of a run that ended: None when it was stopped before its end.
fn read_summary(run: &Path) -> Result<Option<TrialResult>, String> {
    let path = run.join("summary.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if !v["stopped_at"].is_null() {
        return Ok(None);
    }
    let test = v["methods"]["gpo"]
        .as_f64()
        .ok_or_else(|| format!("{}: no `methods.gpo`", path.display()))?;
    Ok(Some(TrialResult {
        test,
        validation: v["validation"]["gpo"].as_f64(),
        best_step: v["best_step"].as_u64().unwrap_or(0),
        steps_run: v["steps"].as_u64().unwrap_or(0),
    }))
}

/// Whether process `pid` is alive and a run of `dir` (a pid file may outlive its process).
fn runs_in(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
}

/// New lines of the events file since `pos`.
fn follow(path: &Path, pos: &mut u64, trial: usize, tx: &Sender<Msg>) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    if f.seek(std::io::SeekFrom::Start(*pos)).is_err() {
        return;
    }
    let mut r = std::io::BufReader::new(f);
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        if !line.ends_with('\n') {
            break; // a line being written: read it next time
        }
        *pos += line.len() as u64;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if let (Some(step), Some(test)) = (v["step"].as_u64(), v["test"].as_f64()) {
                let _ = tx.send(Msg::Eval {
                    trial,
                    step,
                    test,
                    validation: v["validation"].as_f64(),
                });
            }
        }
        line.clear();
    }
}

/// Runs one trial's child process to its end, following its events.
pub fn run_child(
    exe: &Path,
    threads: usize,
    job: &Job,
    pids: &Pids,
    tx: &Sender<Msg>,
    mode: Mode,
) -> Result<Option<TrialResult>, String> {
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::create_dir_all(&job.dir).map_err(|e| io("creating", &job.dir, e))?;
    let run = job.dir.join("run");
    let events = job.dir.join("events.jsonl");
    // A child of a sweep process that died may still be writing its resume point.
    let pid_file = job.dir.join("pid");
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        for _ in 0..1200 {
            if !runs_in(pid, &job.dir) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if job.resume {
        // It ended after the sweep's process died, before its end was recorded.
        if let Ok(Some(done)) = read_summary(&run) {
            follow(&events, &mut 0, job.trial, tx);
            return Ok(Some(done));
        }
    }
    let resume =
        job.resume && !gpo_core::io::checkpoint::resume_points(&run.join("checkpoints")).is_empty();
    if !resume {
        let _ = std::fs::remove_dir_all(&run);
        let _ = std::fs::remove_file(&events);
    }
    let config = job.dir.join("config.toml");
    std::fs::write(
        &config,
        toml::to_string(&job.config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| io("writing", &config, e))?;
    let log_path = job.dir.join("train.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io("opening", &log_path, e))?;
    let mut c = Command::new(exe);
    let mut on_listening = None;
    match mode {
        Mode::Train => {
            c.arg("train");
        }
        Mode::Coordinator {
            listen,
            addr_file,
            credentials,
            on_listening: f,
        } => {
            c.arg("coordinator")
                .args(["--listen", &listen.to_string()])
                .arg("--addr-file")
                .arg(&addr_file)
                // A gang that never arrives fails the trial (and it is retried).
                .args(["--registration-timeout-s", "120"]);
            c.args(credentials);
            on_listening = Some((addr_file, f));
        }
    }
    if resume {
        c.arg("--resume").arg(&run);
    } else {
        c.arg("--config").arg(&config).arg("--out").arg(&run);
    }
    c.arg("--events").arg(&events);
    if job.gang.len() > 1 || on_listening.is_some() {
        c.args(["--workers", &job.gang.len().to_string()]);
    } else {
        c.env("RAYON_NUM_THREADS", threads.to_string());
    }
    if let Some(d) = &job.data {
        c.args(["--data", d]);
    }
    if let Some(f) = &job.format {
        c.args(["--format", f]);
    }
    if let Some(e) = &job.embeddings {
        c.arg("--embeddings").arg(e);
    }
    // The trial's flags and its config file decide the run, not the sweep's environment.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("GPO_") && k != "GPO_LOG" && k != "GPO_FONT" {
            c.env_remove(&k);
        }
    }
    c.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| io("opening", &log_path, e))?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches only this child's own attributes.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1);
            Ok(())
        });
    }
    let mut child = c
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let _ = std::fs::write(&pid_file, child.id().to_string());
    pids.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(job.trial, child.id());
    let mut pos = 0;
    let status = loop {
        follow(&events, &mut pos, job.trial, tx);
        if let Some((file, _)) = &on_listening {
            let port = std::fs::read_to_string(file)
                .ok()
                .and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok())
                .map(|a| a.port());
            if let (Some(port), Some((_, f))) = (port, on_listening.take_if(|_| port.is_some())) {
                f(port);
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                break child
                    .wait()
                    .map_err(|_| format!("waiting for the trial: {e}"))?
            }
        }
    };
    pids.lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&job.trial);
    follow(&events, &mut pos, job.trial, tx);
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let last = text
            .lines()
            .rev()
            .find(|l| l.starts_with("Error") || l.starts_with("error"))
            .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("");
        return Err(format!(
            "gpo train exited with {status}: {last} (log: {})",
            log_path.display()
        ));
    }
    read_summary(&run)
}

impl Executor for Processes {
    fn start(&mut self, job: Job, tx: Sender<Msg>) {
        let (exe, threads, pids) = (self.exe.clone(), self.threads, self.pids.clone());
        std::thread::spawn(move || {
            let result = run_child(&exe, threads, &job, &pids, &tx, Mode::Train);
            let _ = tx.send(Msg::Ended {
                trial: job.trial,
                result,
            });
        });
    }

    fn stop(&mut self, trial: usize) {
        signal(&self.pids, trial);
    }
}

/// Trials that sleep `seconds`, then report a score drawn from the trial index: the
/// benchmark's simulated workers.
pub struct Sleep {
    /// Each trial's compute.
    pub seconds: f64,
}

impl Executor for Sleep {
    fn start(&mut self, job: Job, tx: Sender<Msg>) {
        let d = Duration::from_secs_f64(self.seconds);
        std::thread::spawn(move || {
            std::thread::sleep(d);
            let score = (job.trial as f64 * 0.618_033_988_75).fract();
            let result = TrialResult {
                test: score,
                validation: Some(score),
                best_step: job.steps,
                steps_run: job.steps,
            };
            let _ = tx.send(Msg::Eval {
                trial: job.trial,
                step: job.steps,
                test: score,
                validation: Some(score),
            });
            let _ = tx.send(Msg::Ended {
                trial: job.trial,
                result: Ok(Some(result)),
            });
        });
    }

    fn stop(&mut self, _trial: usize) {}
}
