//! The chaos scenarios that need etcd: a real `etcd` (Debian's etcd-server, which
//! `scripts/setup.sh` installs) on free loopback ports with a temporary data dir, two
//! coordinators campaigning for one run, and workers that find the leader through etcd.
//!
//! - SIGKILL of the leader: the standby is elected when the leader's lease ends, resumes
//!   from the state pointer's resume point, the workers follow it, and the run ends
//!   bitwise as an undisturbed one.
//! - etcd stopped for 5 s and started again: the run goes on (etcd holds membership and
//!   leadership, not the steps), the leadership survives, and the pointer is written
//!   again once etcd is back.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real etcd server on loopback.
struct Etcd {
    proc: Option<Proc>,
    data: PathBuf,
    client: u16,
    peer: u16,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Etcd {
            proc: None,
            data: dir.path().join("data"),
            client: free_port(),
            peer: free_port(),
            _dir: dir,
        };
        e.run();
        e
    }

    fn url(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    fn run(&mut self) {
        let c = format!("http://127.0.0.1:{}", self.client);
        let p = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t={p}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (scripts/setup.sh installs Debian's etcd-server)");
        self.proc = Some(Proc {
            child,
            name: "etcd".into(),
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("etcdctl")
                .args(["--endpoints", &self.url(), "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal("KILL");
            let _ = p.wait(Duration::from_secs(10));
        }
    }

    fn get(&self, key: &str) -> String {
        let o = Command::new("etcdctl")
            .args(["--endpoints", &self.url(), "get", key, "--print-value-only"])
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

/// A coordinator of run `t` in etcd; its address file appears once it is elected.
fn elected_coordinator(dir: &Path, name: &str, etcd: &str, ttl: &str) -> (Proc, PathBuf) {
    let addr_file = dir.join(format!("addr-{name}"));
    let mut c = gpo();
    c.arg("coordinator");
    run_flags(&mut c);
    let child = c
        .args(["--workers", "2", "--listen", "127.0.0.1:0"])
        .args(["--heartbeat-ms", "200", "--heartbeat-timeout-s", "3"])
        .args(["--etcd", etcd, "--run-name", "t", "--etcd-lease-ttl-s", ttl])
        .args(["--checkpoint-every", "5"])
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (
        Proc {
            child,
            name: format!("coordinator {name}"),
        },
        addr_file,
    )
}

fn wait_file(f: &Path, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(a) = std::fs::read_to_string(f) {
            return a;
        }
        assert!(Instant::now() < deadline, "{} never appeared", f.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn etcd_worker(etcd: &str, name: &str) -> Proc {
    Proc {
        child: gpo()
            .args(["worker", "--etcd", etcd, "--run-name", "t", "--name", name])
            .args(["--connect-timeout-s", "60", "--threads", "1"])
            .args(["--io-timeout-s", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        name: name.into(),
    }
}

#[test]
fn sigkill_of_the_leader_coordinator_hands_the_run_to_the_standby() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let etcd = Etcd::start();
    let (leader, fa) = elected_coordinator(dir.path(), "a", &etcd.url(), "2");
    let addr_a = wait_file(&fa, Duration::from_secs(60));
    let (standby, fb) = elected_coordinator(dir.path(), "b", &etcd.url(), "2");
    let mut ws: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| etcd_worker(&etcd.url(), n))
        .collect();
    wait_step_or_show(&addr_a, 25, &mut ws);
    assert!(
        !fb.exists(),
        "the standby must not serve while the leader lives"
    );
    let killed_after = step_of(&status(&addr_a)).unwrap();
    leader.signal("KILL");
    let t_kill = Instant::now();
    drop(leader);
    let addr_b = wait_file(&fb, Duration::from_secs(60));
    let takeover = t_kill.elapsed().as_secs_f64();
    let ptr: serde_json::Value = serde_json::from_str(&etcd.get("/gpo/t/state")).unwrap();
    let from = ptr["step"].as_u64().unwrap();
    wait_step_or_show(&addr_b, from + 1, &mut ws);
    let recovered = t_kill.elapsed().as_secs_f64();
    all_succeed(standby, ws, "the standby failed");
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "leader SIGKILL");
    let resumed = s["resumed_from"].as_u64().unwrap();
    assert!(resumed <= killed_after + 1, "{resumed} {killed_after}");
    // The standby numbered its generations after the leader's.
    assert!(s["distributed"]["generation"].as_u64().unwrap() >= 2);
    eprintln!(
        "chaos: leader-sigkill: standby elected {takeover:.3}s after the kill (lease TTL 2 s), first step committed after {recovered:.3}s, resumed from step {resumed}, killed after step {killed_after}, about {} steps recomputed",
        killed_after.saturating_sub(resumed)
    );
}

#[test]
fn etcd_stopped_for_five_seconds_does_not_disturb_the_run() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let mut etcd = Etcd::start();
    let (leader, fa) = elected_coordinator(dir.path(), "a", &etcd.url(), "10");
    let addr = wait_file(&fa, Duration::from_secs(60));
    let ws: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|n| etcd_worker(&etcd.url(), n))
        .collect();
    wait_step(&addr, 15);
    etcd.stop();
    let stopped_at = step_of(&status(&addr)).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let during = step_of(&status(&addr)).unwrap();
    etcd.run();
    all_succeed(leader, ws, "the coordinator failed");
    let s = assert_undisturbed(&dir.path().join("run"), &reference, "etcd stop");
    assert!(
        s["recoveries"].as_array().unwrap().is_empty(),
        "{}",
        s["recoveries"]
    );
    assert!(during > stopped_at, "training went on while etcd was down");
    // The pointer caught up once etcd was back: it names the last resume point.
    let ptr: serde_json::Value = serde_json::from_str(&etcd.get("/gpo/t/state")).unwrap();
    assert_eq!(ptr["step"].as_u64().unwrap(), STEPS, "{ptr}");
    eprintln!(
        "chaos: etcd-stop: 5 s outage from step {stopped_at}; {} steps committed during it, no recovery needed",
        during - stopped_at
    );
}

/// `gpo sweep --etcd`: the sweep's folder is one small value in etcd
/// (`/gpo/<name>/sweep`), so a sweep started again with `--etcd` and no `--out` finds its
/// folder and resumes there (here: nothing is left to run).
#[test]
fn a_sweep_records_its_folder_in_etcd_and_is_found_again_without_out() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("sweep.toml");
    std::fs::write(
        &spec,
        "[sweep]\nname = \"etcd-sweep\"\nmetric = \"test\"\n[train]\nsteps = 4\neval_every = 2\nselection = \"test\"\n\
         [train.model]\nd_model = 8\nnum_layers = 1\ndim_feedforward = 8\nnhead = 2\n[space]\nseed = [0, 1]\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = support::sweep(&spec, Some(&out))
        .args(["--etcd", &etcd.url()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", support::text(&o));
    let v: serde_json::Value = serde_json::from_str(&etcd.get("/gpo/etcd-sweep/sweep")).unwrap();
    assert_eq!(
        Path::new(v["out"].as_str().unwrap()),
        std::path::absolute(&out).unwrap()
    );
    let o = support::sweep(&spec, None)
        .args(["--etcd", &etcd.url()])
        .output()
        .unwrap();
    let t = support::text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("resuming; 2 of 2 trials already ended"), "{t}");
    // A sweep etcd has never seen needs --out.
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("etcd-sweep", "other"),
    )
    .unwrap();
    let o = support::sweep(&spec, None)
        .args(["--etcd", &etcd.url()])
        .output()
        .unwrap();
    let t = support::text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("etcd has no /gpo/other/sweep: pass --out"),
        "{t}"
    );
}
