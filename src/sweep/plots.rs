//! PNG plots of a sweep: the ranking score against each swept parameter, one point per
//! trial that ran (stopped trials hollow), so a user sees which knobs matter.

use crate::experiment::plots::{ensure_font, err, COLORS};
use anyhow::Result;
use gpo_sweep::record::TrialRecord;
use gpo_sweep::schedule::Phase;
use plotters::prelude::*;
use std::path::Path;

/// Writes `DIR/plots/score_vs_<param>.png` for every swept parameter.
pub fn write(out: &Path, recs: &[TrialRecord], metric: &str) -> Result<()> {
    let ran: Vec<&TrialRecord> = recs
        .iter()
        .filter(|r| matches!(r.phase, Phase::Done | Phase::Stopped) && r.score.is_some())
        .collect();
    if ran.is_empty() {
        return Ok(());
    }
    ensure_font()?;
    let dir = out.join("plots");
    std::fs::create_dir_all(&dir)?;
    let mut keys: Vec<&String> = ran.iter().flat_map(|r| r.params.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let vals: Vec<&str> = ran
            .iter()
            .map(|r| r.params.get(key).map_or("", |s| s.as_str()))
            .collect();
        let nums: Option<Vec<f64>> = vals.iter().map(|v| v.parse::<f64>().ok()).collect();
        // Numbers on their axis (log10 when they span more than a decade and are positive);
        // anything else as categories in order of first appearance.
        let mut cats: Vec<&str> = Vec::new();
        let (xs, label, log): (Vec<f64>, String, bool) = match nums {
            Some(n) => {
                let (lo, hi) = n
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
                if lo > 0.0 && hi / lo > 10.0 {
                    (
                        n.iter().map(|x| x.log10()).collect(),
                        format!("log10 {key}"),
                        true,
                    )
                } else {
                    (n, key.clone(), false)
                }
            }
            None => {
                for v in &vals {
                    if !cats.contains(v) {
                        cats.push(v);
                    }
                }
                let xs = vals
                    .iter()
                    .map(|v| cats.iter().position(|c| c == v).unwrap_or(0) as f64)
                    .collect();
                (xs, key.clone(), false)
            }
        };
        let _ = log;
        let (mut x0, mut x1) = xs
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        let pad = ((x1 - x0) * 0.08).max(0.5);
        x0 -= pad;
        x1 += pad;
        let scores: Vec<f64> = ran.iter().map(|r| r.score.unwrap_or(0.0)).collect();
        let (mut y0, mut y1) = scores
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        let ypad = ((y1 - y0) * 0.1).max(0.005);
        y0 -= ypad;
        y1 += ypad;
        let safe: String = key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("score_vs_{safe}.png"));
        let root = BitMapBackend::new(&path, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{metric} score against {key}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        let cats2 = cats.clone();
        chart
            .configure_mesh()
            .x_desc(label)
            .y_desc(format!("{metric} alignment"))
            .x_label_formatter(&|x| {
                if cats2.is_empty() {
                    format!("{x:.3}")
                } else {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats2.len() {
                        cats2[i as usize].to_string()
                    } else {
                        String::new()
                    }
                }
            })
            .draw()
            .map_err(err)?;
        let color = COLORS[0];
        chart
            .draw_series(ran.iter().zip(&xs).zip(&scores).map(|((r, x), y)| {
                let style = if r.phase == Phase::Stopped {
                    color.stroke_width(2)
                } else {
                    color.filled()
                };
                Circle::new((*x, *y), 4, style)
            }))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(())
}
