//! PNG plots of an experiment (plotters, bitmap backend): alignment by method and split,
//! the few-shot curve, and training/validation curves.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// Where Debian-like systems keep DejaVu Sans (package `fonts-dejavu-core`).
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
];

/// Registers a TrueType font as plotters' "sans-serif" once per process.
pub(crate) fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var("GPO_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                "no TrueType font for plots: install fonts-dejavu-core (scripts/setup.sh does) or set GPO_FONT".to_string()
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path}: not a usable TrueType font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

pub(crate) const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

pub(crate) fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// Mean ± std of a method on a split.
pub type Stat = (f64, f64);

/// Grouped bars: one group per split, one bar per method, with ± std whiskers.
pub fn bars(
    path: &Path,
    title: &str,
    splits: &[String],
    methods: &[String],
    stat: &BTreeMap<(String, String), Stat>,
) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let vals: Vec<f64> = stat.values().flat_map(|(m, s)| [m - s, m + s]).collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() {
        (lo - 0.05).max(0.0)
    } else {
        0.0
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..splits.len() as f64, lo..1.0)
        .map_err(err)?;
    let names = splits.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(splits.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (*x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                format!("train split {}", names[i as usize])
            } else {
                String::new()
            }
        })
        .y_desc("alignment")
        .draw()
        .map_err(err)?;
    let width = 0.8 / methods.len().max(1) as f64;
    for (j, m) in methods.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let mut rects = Vec::new();
        let mut whiskers = Vec::new();
        for (i, sp) in splits.iter().enumerate() {
            if let Some(&(mean, sd)) = stat.get(&(sp.clone(), m.clone())) {
                let x0 = i as f64 + 0.1 + j as f64 * width;
                rects.push(Rectangle::new(
                    [(x0, lo), (x0 + width * 0.9, mean)],
                    color.filled(),
                ));
                let xc = x0 + width * 0.45;
                whiskers.push(PathElement::new(
                    vec![(xc, mean - sd), (xc, mean + sd)],
                    BLACK.stroke_width(2),
                ));
            }
        }
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(m.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(whiskers).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present()
        .map_err(err)
        .with_context(|| path.display().to_string())
}

/// Lines of y against x, one per named series; `y_desc` labels the y axis.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        (0.0, 1.0)
    };
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = if y0.is_finite() {
        (y0 - pad, y1 + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (j, (name, v)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let v: Vec<(f64, f64)> = v.iter().copied().filter(|p| p.1.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(v.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
        chart
            .draw_series(v.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present()
        .map_err(err)
        .with_context(|| path.display().to_string())
}
