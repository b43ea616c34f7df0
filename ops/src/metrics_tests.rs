//! Unit tests of the metric families: names and types of the contract, bounded labels, the
//! counters' deltas and the plain text encoding.

use super::*;

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_coordinator_families_have_the_names_of_the_contract() {
    let mut r = registry(Role::Coordinator);
    let m = CoordinatorMetrics::default();
    m.register(&mut r);
    let t = encode_text(&r);
    for (name, kind) in [
        ("gpo_build_info", "gauge"),
        ("gpo_step_duration_seconds", "histogram"),
        ("gpo_episodes_total", "counter"),
        ("gpo_train_loss", "gauge"),
        ("gpo_workers", "gauge"),
        ("gpo_membership_generation", "gauge"),
        ("gpo_worker_restarts_total", "counter"),
        ("gpo_steps_aborted_total", "counter"),
        ("gpo_recoveries_total", "counter"),
        ("gpo_fenced_messages_total", "counter"),
        ("gpo_last_step_timestamp_seconds", "gauge"),
    ] {
        assert!(
            t.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} missing in\n{t}"
        );
    }
    assert!(!t.contains("# EOF"), "plain text has no OpenMetrics EOF");
    // No evaluation yet: no alignment series rather than a made-up score.
    assert!(!t.contains("gpo_alignment_score{"), "{t}");
    assert!(t.contains(&format!(
        "gpo_build_info{{version=\"{}\",role=\"coordinator\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )));
    // Known label values are exported at zero from the start.
    assert_eq!(
        sample(&t, "gpo_steps_aborted_total{reason=\"deadline\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&t, "gpo_step_duration_seconds_count{phase=\"dispatch\"}"),
        Some(0.0)
    );
}

#[test]
fn sync_adds_only_what_the_machine_added_and_maps_kinds_to_bounded_reasons() {
    let mut r = registry(Role::Coordinator);
    let m = CoordinatorMetrics::default();
    m.register(&mut r);
    let mut t = MachineTotals {
        fenced_messages: 2,
        recoveries: 1,
        aborted: vec![("lost".into(), 1)],
        live: 3,
        members: 2,
        expected: 3,
        generation: 4,
    };
    m.sync(&t);
    m.sync(&t); // the same totals again add nothing
    t.aborted = vec![("lost".into(), 3), ("martian".into(), 1)];
    t.fenced_messages = 5;
    t.live = 2;
    m.sync(&t);
    m.committed(0.25, 12, 1.7e9);
    m.committed(0.5, 12, 1.8e9);
    m.alignment(Split::Validation, 0.75);
    let s = encode_text(&r);
    assert_eq!(sample(&s, "gpo_fenced_messages_total"), Some(5.0));
    assert_eq!(sample(&s, "gpo_recoveries_total"), Some(1.0));
    assert_eq!(
        sample(&s, "gpo_steps_aborted_total{reason=\"worker_lost\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample(&s, "gpo_steps_aborted_total{reason=\"other\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&s, "gpo_workers{state=\"live\"}"), Some(2.0));
    assert_eq!(sample(&s, "gpo_workers{state=\"member\"}"), Some(2.0));
    assert_eq!(sample(&s, "gpo_membership_generation"), Some(4.0));
    assert_eq!(sample(&s, "gpo_episodes_total"), Some(24.0));
    assert_eq!(sample(&s, "gpo_train_loss"), Some(0.5));
    assert_eq!(sample(&s, "gpo_last_step_timestamp_seconds"), Some(1.8e9));
    assert_eq!(
        sample(&s, "gpo_alignment_score{split=\"validation\"}"),
        Some(0.75)
    );
    assert!(
        !s.contains("martian"),
        "a free-form kind never becomes a label"
    );
}

#[test]
fn worker_families_count_phases_and_bytes_across_collectives() {
    let mut r = registry(Role::Worker);
    let m = WorkerMetrics::default();
    m.register(&mut r);
    m.step(0.5, 0.25, 0.125);
    m.allreduce_sent(1000);
    m.allreduce_sent(1500);
    m.collective_reset();
    m.allreduce_sent(200);
    m.embed.batch(64, 0.01);
    let s = encode_text(&r);
    assert_eq!(sample(&s, "gpo_allreduce_bytes_total"), Some(1700.0));
    assert_eq!(
        sample(&s, "gpo_step_duration_seconds_sum{phase=\"allreduce\"}"),
        Some(0.25)
    );
    assert_eq!(
        sample(&s, "gpo_step_duration_seconds_count{phase=\"optimizer\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&s, "gpo_embed_tokens_total"), Some(64.0));
    assert_eq!(sample(&s, "gpo_embed_duration_seconds_count"), Some(1.0));
    assert!(s.contains("role=\"worker\""));
    // Refuse nonsense durations rather than poison the sums.
    m.step(f64::NAN, -1.0, 0.0);
    let s = encode_text(&r);
    assert_eq!(
        sample(&s, "gpo_step_duration_seconds_count{phase=\"compute\"}"),
        Some(1.0)
    );
}
