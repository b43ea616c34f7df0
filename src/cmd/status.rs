//! `gpo status`: a coordinator's run as it stands — step, membership generation, what it
//! waits for, workers, recent step times, the generation history and the recoveries.

use anyhow::Result;
use gpo_proto::v1 as pb;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The coordinator's address: host:port (as it prints it) or http://host:port.
    #[arg(long, env = "GPO_COORDINATOR")]
    pub coordinator: String,
    /// Print the raw status as JSON-like debug output instead of the table.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub credentials: crate::cmd::credentials::Flags,
}

/// Renders a status for people.
pub fn render(s: &pb::RunStatus) -> String {
    let mut out = String::new();
    let members = s.workers.iter().filter(|w| w.member).count();
    out.push_str(&format!(
        "run {}: {}, step {}/{}, generation {}, {} of {} workers in the membership ({} registered)\n",
        s.run_id,
        s.state,
        s.step,
        s.total_steps,
        s.generation,
        members,
        s.expected_workers,
        s.workers.len()
    ));
    if !s.error.is_empty() {
        out.push_str(&format!("error: {}\n", s.error));
    }
    if !s.waiting_for.is_empty() {
        out.push_str(&format!("waiting for {}\n", s.waiting_for));
    }
    out.push_str(&format!(
        "{:<4} {:<24} {:>4} {:>6} {:>9} {:>10}  {:<8} metrics\n",
        "id", "name", "rank", "member", "last step", "last seen", "device"
    ));
    for w in &s.workers {
        out.push_str(&format!(
            "{:<4} {:<24} {:>4} {:>6} {:>9} {:>9.1}s  {:<8} {}\n",
            w.worker_id,
            w.name,
            if w.member {
                w.rank.to_string()
            } else {
                "-".into()
            },
            if w.member { "yes" } else { "no" },
            w.last_step,
            w.last_seen_ms as f64 / 1000.0,
            w.capabilities.as_ref().map_or("", |c| c.device.as_str()),
            w.capabilities
                .as_ref()
                .map(|c| c.metrics_addr.as_str())
                .filter(|m| !m.is_empty())
                .map_or("-".to_string(), |m| format!("http://{m}/metrics")),
        ));
    }
    if !s.recent_steps.is_empty() {
        out.push_str(&format!(
            "{:>6} {:>9} {:>10} {:>9} {:>9}\n",
            "step", "step_s", "compute_s", "reduce_s", "loss"
        ));
        for t in &s.recent_steps {
            out.push_str(&format!(
                "{:>6} {:>9.4} {:>10.4} {:>9.4} {:>9.4}\n",
                t.step, t.step_s, t.compute_s, t.reduce_s, t.loss
            ));
        }
    }
    if !s.generations.is_empty() {
        out.push_str("generations:\n");
        for g in &s.generations {
            let ids: Vec<String> = g.members.iter().map(u64::to_string).collect();
            out.push_str(&format!(
                "  {:>4} at {:>8.2}s  workers [{}]  {}\n",
                g.generation,
                g.at_s,
                ids.join(", "),
                g.reason
            ));
        }
    }
    if !s.recoveries.is_empty() {
        out.push_str("recoveries:\n");
        for r in &s.recoveries {
            let rec = if r.recover_s < 0.0 {
                "recovering".to_string()
            } else {
                format!("recovered in {:.2}s", r.recover_s)
            };
            out.push_str(&format!(
                "  step {:>6}: detected in {:.2}s, {rec}, {} step(s) recomputed: {}\n",
                r.step, r.detect_s, r.steps_recomputed, r.reason
            ));
        }
    }
    out
}

/// Writes to stdout; a closed pipe (`gpo status | head`) ends quietly instead of panicking.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

pub fn run(a: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        let (creds, max) = a.credentials.client()?;
        let mut c =
            gpo_worker::client::connect_with(&a.coordinator, Duration::from_secs(5), &creds, max)
                .await?;
        c.status(pb::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow::anyhow!("status: {}", s.message()))
    })?;
    if a.raw {
        emit(&format!("{status:#?}\n"))
    } else {
        emit(&render(&status))
    }
}
