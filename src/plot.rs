//! Charts drawn with `plotters` into PNG files.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Registers a system sans-serif font once; charts have no text where none is found.
fn have_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                // The font must live as long as the process: plotters keeps a 'static reference.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Training loss (per step, lightly smoothed) and validation loss against steps.
pub fn loss_curve(path: &Path, train: &[(u64, f64)], val: &[(u64, f64)]) -> Result<()> {
    let text = have_font();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_step = train
        .iter()
        .chain(val)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1);
    let ys = train
        .iter()
        .chain(val)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.95, hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if text { 45 } else { 5 })
        .y_label_area_size(if text { 60 } else { 5 });
    if text {
        builder.caption("igpt training: loss (nats/token)", ("sans-serif", 22));
    }
    let mut chart = builder.build_cartesian_2d(0u64..max_step, lo..hi)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("nats / token")
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()?;
    }
    // Exponential moving average keeps the curve readable with small batches.
    let mut ema = None;
    let smooth: Vec<(u64, f64)> = train
        .iter()
        .map(|&(s, l)| {
            let e = ema.map_or(l, |e: f64| 0.9 * e + 0.1 * l);
            ema = Some(e);
            (s, e)
        })
        .collect();
    let train_series = chart.draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?;
    if text {
        train_series
            .label("train (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    let val_series = chart
        .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)).point_size(4))?;
    if text {
        val_series
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Draws the loss curve from a run's `metrics.jsonl`.
pub fn loss_curve_from_metrics(metrics: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_u64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    // Write to a temporary name and rename, so a reader never sees half a PNG.
    let tmp = out.with_extension("png.tmp.png");
    loss_curve(&tmp, &train, &val)?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// The chart corner whose box (40% of the width, 30% of the height) holds the fewest points,
/// so the legend hides as little data as it can (lower right among ties).
pub fn legend_corner(
    points: &[(f64, f64)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> SeriesLabelPosition {
    let (w, h) = ((x1 - x0) * 0.4, (y1 - y0) * 0.3);
    let count = |right: bool, top: bool| {
        points
            .iter()
            .filter(|(x, y)| {
                let in_x = if right { *x >= x1 - w } else { *x <= x0 + w };
                let in_y = if top { *y >= y1 - h } else { *y <= y0 + h };
                in_x && in_y
            })
            .count()
    };
    [
        (SeriesLabelPosition::LowerRight, count(true, false)),
        (SeriesLabelPosition::UpperRight, count(true, true)),
        (SeriesLabelPosition::LowerLeft, count(false, false)),
        (SeriesLabelPosition::UpperLeft, count(false, true)),
    ]
    .into_iter()
    .min_by_key(|c| c.1)
    .map(|c| c.0)
    .unwrap_or(SeriesLabelPosition::LowerRight)
}

/// One named line (points joined in x order) of an [`xy_chart`].
pub struct Series<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// A line chart with optional horizontal reference line and a highlighted point.
pub fn xy_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    reference: Option<(&str, f64)>,
    highlight: Option<(f64, f64)>,
) -> Result<()> {
    let text = have_font();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = || series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    let (mut y0, mut y1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if let Some((_, y)) = reference {
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    anyhow::ensure!(x0.is_finite() && y0.is_finite(), "nothing to plot");
    let xpad = if x1 > x0 { (x1 - x0) * 0.08 } else { 0.5 };
    let ypad = ((y1 - y0) * 0.1).max(0.005);
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if text { 45 } else { 5 })
        .y_label_area_size(if text { 60 } else { 5 });
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart =
        builder.build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))?;
    if text {
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()?;
    }
    for s in series {
        let mut p = s.points.clone();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = s.color;
        let drawn = chart.draw_series(LineSeries::new(p, color.stroke_width(2)).point_size(4))?;
        if text {
            drawn
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if let Some((label, y)) = reference {
        let drawn = chart.draw_series(LineSeries::new(
            vec![(x0 - xpad, y), (x1 + xpad, y)],
            BLACK.stroke_width(1),
        ))?;
        if text {
            drawn
                .label(label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
    }
    if let Some(p) = highlight {
        chart.draw_series(std::iter::once(Circle::new(p, 9, RED.stroke_width(3))))?;
    }
    if text {
        let x_range = (x0 - xpad, x1 + xpad);
        let y_range = (y0 - ypad, y1 + ypad);
        let mut all: Vec<(f64, f64)> = pts().collect();
        if let Some((_, y)) = reference {
            all.extend([x0, (x0 + x1) / 2.0, x1].map(|x| (x, y)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(legend_corner(&all, x_range, y_range))
            .draw()?;
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_goes_to_the_emptiest_corner() {
        let (xr, yr) = ((0.0, 1.0), (0.0, 1.0));
        // Accuracy falling as loss rises: the lower right holds a point, the upper right none.
        let falling = [(0.05, 0.95), (0.5, 0.5), (0.95, 0.05)];
        assert!(matches!(
            legend_corner(&falling, xr, yr),
            SeriesLabelPosition::UpperRight
        ));
        // Rising: lower right is free and wins the tie with the upper left.
        let rising = [(0.05, 0.05), (0.5, 0.5), (0.95, 0.95)];
        assert!(matches!(
            legend_corner(&rising, xr, yr),
            SeriesLabelPosition::LowerRight
        ));
        // Points in three corners leave the fourth.
        let three = [(0.05, 0.05), (0.95, 0.05), (0.95, 0.95)];
        assert!(matches!(
            legend_corner(&three, xr, yr),
            SeriesLabelPosition::UpperLeft
        ));
    }
}
