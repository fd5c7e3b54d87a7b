//! Perplexity-vs-footprint plots for the reports, as SVG and PNG (plotters).
//!
//! Text is rendered with ab_glyph from DejaVu Sans, read at run time from the system fonts
//! (Debian: `fonts-dejavu-core`), so no font is compiled in and no C font stack is needed.
//! The perplexity axis is logarithmic: 2-bit models are orders of magnitude worse than 8-bit
//! ones, and on a linear axis everything above 3 bits would sit on one line.

use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const FONT: &str = "sans-serif";

/// One line of points `(x, y)`, drawn in x order.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Single labelled points.
    pub marks: Vec<(String, f64, f64)>,
}

fn register_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                format!(
                    "no DejaVu Sans font found (looked in {FONT_PATHS:?}); install fonts-dejavu-core"
                )
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path}: not a usable TrueType font"))
    })
    .clone()
    .map_err(Error::input)
}

/// Horizontal bars from zero, each labelled with its text above it.
pub struct Bars {
    pub title: String,
    pub x_label: String,
    /// `(label, value, highlighted)`, drawn top to bottom.
    pub bars: Vec<(String, f64, bool)>,
}

/// Writes the chart to `svg` and `png` (1000 x 650).
pub fn write(chart: &Chart, svg: &Path, png: &Path) -> Result<()> {
    write_with(svg, png, |root| draw(root, chart), |root| draw(root, chart))
}

/// Writes the bar chart to `svg` and `png` (1000 x 650).
pub fn write_bars(bars: &Bars, svg: &Path, png: &Path) -> Result<()> {
    write_with(
        svg,
        png,
        |root| draw_bars(root, bars),
        |root| draw_bars(root, bars),
    )
}

type Drawn = std::result::Result<(), String>;

fn write_with(
    svg: &Path,
    png: &Path,
    to_svg: impl FnOnce(DrawingArea<SVGBackend, Shift>) -> Drawn,
    to_png: impl FnOnce(DrawingArea<BitMapBackend, Shift>) -> Drawn,
) -> Result<()> {
    register_font()?;
    let size = (1000, 650);
    to_svg(SVGBackend::new(svg, size).into_drawing_area())
        .map_err(|e| Error::format(svg.display(), e))?;
    to_png(BitMapBackend::new(png, size).into_drawing_area())
        .map_err(|e| Error::format(png.display(), e))?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, b: &Bars) -> Drawn
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let max = b.bars.iter().map(|x| x.1).fold(0.0, f64::max);
    if b.bars.is_empty() || max <= 0.0 {
        return Err("no bars to plot".into());
    }
    let n = b.bars.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(&b.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..max * 1.05, 0.0..n)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(&b.x_label)
        .y_labels(0)
        .disable_y_mesh()
        .x_max_light_lines(1)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    for (i, (label, v, hi)) in b.bars.iter().enumerate() {
        let y = n - i as f64;
        let color = if *hi {
            Palette99::pick(0)
        } else {
            Palette99::pick(4)
        };
        c.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y - 0.85), (*v, y - 0.3)],
            color.mix(0.8).filled(),
        )))
        .map_err(err)?;
        // The label above its bar, from the axis: after the bar's end, the longest bar's ran
        // past the plot's right edge.
        c.draw_series(std::iter::once(Text::new(
            label.clone(),
            (max * 0.005, y - 0.16),
            (FONT, 15).into_font().color(&BLACK),
        )))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let all = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(chart.marks.iter().map(|m| (m.1, m.2)));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 || y0.is_nan() || y0 <= 0.0 {
        return Err("nothing to plot (or a non-positive perplexity)".into());
    }
    // More room on the right: the marks' labels are written to the right of their points.
    let pad = (x1 - x0).max(1.0) * 0.05;
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(
            (x0 - pad)..(x1 + 3.0 * pad),
            ((y0 * 0.9)..(y1 * 1.1)).log_scale(),
        )
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .y_label_formatter(&|v| {
            if *v >= 1e4 {
                format!("{v:.0e}")
            } else {
                format!("{v:.0}")
            }
        })
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    for (label, x, y) in &chart.marks {
        c.draw_series(std::iter::once(TriangleMarker::new(
            (*x, *y),
            7,
            BLACK.filled(),
        )))
        .map_err(err)?;
        c.draw_series(std::iter::once(Text::new(
            label.clone(),
            (*x, *y * 1.03),
            (FONT, 14).into_font().color(&BLACK),
        )))
        .map_err(err)?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
