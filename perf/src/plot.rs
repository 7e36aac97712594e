//! PNG line plots (plotters, bitmap backend, text through ab_glyph with a
//! TrueType font found on the machine: fonts-dejavu-core, installed by
//! scripts/peers.sh).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One line: (x, median, min, max) per point; min..max drawn as an error bar.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// One chart of a figure.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Distinct on white: red, blue, green, orange, purple, black.
const COLORS: &[RGBColor] =
    &[RGBColor(214, 39, 40), RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(255, 127, 14), RGBColor(148, 103, 189), RGBColor(0, 0, 0)];

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers the first font found as "sans-serif" (once).
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let Some(bytes) = FONTS.iter().find_map(|f| std::fs::read(f).ok()) else {
            return Err(format!("no TrueType font found (tried {}; scripts/peers.sh installs fonts-dejavu-core)", FONTS.join(", ")));
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "the font file is not a usable TrueType font".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `panels` side by side into `path`. With `log2_x`, x values are
/// plotted on a log2 axis (queue depths).
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, log2_x: bool, panels: &[Panel]) -> Result<()> {
    font()?;
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    let width = 640 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|e| anyhow!("{e}"))?;
    let tx = |x: f64| if log2_x { x.max(1e-9).log2() } else { x };
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let pts = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
        // The y range follows the medians (one wild repetition must not
        // flatten the rest); error bars are cut at the top.
        for &(x, m, _, _) in pts {
            x0 = x0.min(tx(x));
            x1 = x1.max(tx(x));
            y1 = y1.max(m);
        }
        let top = (y1 * 1.5).max(1e-9);
        if x0 > x1 {
            continue;
        }
        let pad = ((x1 - x0) * 0.05).max(0.25);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(64)
            .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..top)
            .map_err(|e| anyhow!("{e}"))?;
        // On a log2 axis only whole powers of two get a label.
        let fmt_x = move |x: &f64| {
            if !log2_x {
                format!("{x:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
            } else if (x - x.round()).abs() < 0.02 {
                format!("{:.0}", 2f64.powf(x.round()))
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&fmt_x)
            .x_labels(if log2_x { 4 * ((x1 - x0).ceil() as usize + 1) } else { 10 })
            .y_label_formatter(&|y: &f64| if y.abs() >= 100.0 { format!("{y:.0}") } else { format!("{y:.1}") })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, s) in panel.series.iter().enumerate() {
            if s.points.is_empty() {
                continue;
            }
            let color = COLORS[i % COLORS.len()].to_rgba();
            let line: Vec<(f64, f64)> = s.points.iter().map(|p| (tx(p.0), p.1)).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(
                    s.points.iter().filter(|p| p.3 > p.2).map(|p| ErrorBar::new_vertical(tx(p.0), p.2.min(top), p.1, p.3.min(top), color.stroke_width(1), 8)),
                )
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        if font().is_err() {
            // No font on this machine: lines() says so, which is what a run reports.
            assert!(lines(Path::new("/nonexistent.png"), "t", "x", "y", false, &[]).is_err());
            return;
        }
        let dir = std::env::temp_dir().join(format!("ringvm-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.png");
        let panel = |t: &str| Panel {
            title: t.into(),
            series: vec![
                Series { name: "a".into(), points: vec![(1.0, 2.0, 1.5, 2.5), (4.0, 3.0, 3.0, 3.0)] },
                Series { name: "b".into(), points: vec![(2.0, 1.0, 1.0, 1.0)] },
            ],
        };
        lines(&p, "title", "x", "y", true, &[panel("one"), panel("two")]).unwrap();
        let png = std::fs::read(&p).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(png.len() > 5000, "{} bytes", png.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
