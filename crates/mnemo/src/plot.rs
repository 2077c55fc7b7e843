//! PNG charts of a training run: line charts (loss curves) and bar charts (benchmarks).
//!
//! Rendering uses plotters' bitmap backend with DejaVu Sans embedded in the binary
//! (`assets/DejaVuSans.ttf`), so charts need no fonts installed on the machine. Every chart
//! is written atomically: rendered to a temporary `.png` in the destination's directory, then
//! renamed over the destination, so a reader never sees a half-written image.

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// Size of [`line_chart`] images, in pixels.
pub const LINE_CHART_SIZE: (u32, u32) = (1000, 600);
/// Size of [`bar_chart`] images, in pixels.
pub const BAR_CHART_SIZE: (u32, u32) = (800, 500);

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");

/// Matplotlib's "tab10": distinct, colour-blind-friendlier than plotters' primaries.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(232, 232, 232);
const GREY: RGBColor = RGBColor(110, 110, 110);
/// Light grid lines between two labelled ones (plotters' default of 10 is too busy).
const LIGHT_LINES: usize = 1;

/// A series this short also gets a marker at each point (a line through 1–2 points is
/// invisible or misleading).
const MARKER_MAX_POINTS: usize = 60;

/// Register the embedded font with plotters, once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the embedded font assets/DejaVuSans.ttf is not a valid font"
        ))
    }
}

/// plotters' drawing errors are generic over the backend; flatten them into anyhow.
fn de<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// Render with `render` into a temporary `.png` next to `path`, then rename it to `path`.
/// The temporary file is removed if rendering fails.
fn write_png_atomic(path: &Path, render: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    // The name must end in `.png`: the bitmap backend picks the encoder from the extension.
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}-{}.png",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if let Err(e) = render(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot render chart {}", path.display())));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!(
            "cannot rename {} to {}",
            tmp.display(),
            path.display()
        ))
    })
}

/// `(lo, hi)` of `values` widened by 5% of the span on each side; a zero span is widened to a
/// visible range around the value.
fn padded_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return None;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else if lo == 0.0 {
        1.0
    } else {
        lo.abs() * 0.05
    };
    Some((lo - pad, hi + pad))
}

/// Tick label for value `v` on an axis from `lo` to `hi`: as many decimals as the tick spacing
/// needs (integers without a decimal point), or scientific notation on the whole axis when its
/// magnitude is extreme, so that all labels of an axis look alike.
fn fmt_tick(v: f64, lo: f64, hi: f64) -> String {
    let span = (hi - lo).abs();
    let magnitude = lo.abs().max(hi.abs());
    // Tick positions are computed in floating point; snap near-zero noise to 0.
    if v == 0.0 || v.abs() < span * 1e-9 {
        return "0".to_string();
    }
    if !(1e-6..1e9).contains(&magnitude) {
        return format!("{v:.2e}");
    }
    let step = span / 10.0;
    let decimals = if step >= 1.0 || step <= 0.0 {
        0
    } else {
        ((-step.log10()).ceil() as usize).min(8)
    };
    format!("{v:.decimals$}")
}

/// A bar's value printed above it: about four significant digits, no trailing zeros.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.3e}");
    }
    let decimals = if a >= 100.0 {
        1
    } else if a >= 10.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn centered(size: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).pos(Pos::new(h, v))
}

/// The placeholder image: the title at the top and "no data yet" in the middle.
fn draw_no_data(root: &DrawingArea<BitMapBackend<'_>, Shift>, title: &str) -> Result<()> {
    let (w, h) = root.dim_in_pixel();
    let (cx, cy) = ((w / 2) as i32, (h / 2) as i32);
    root.draw(&Text::new(
        title.to_string(),
        (cx, 20),
        centered(26, HPos::Center, VPos::Top),
    ))
    .map_err(de)?;
    root.draw(&Text::new(
        "no data yet".to_string(),
        (cx, cy),
        centered(32, HPos::Center, VPos::Center).color(&GREY),
    ))
    .map_err(de)?;
    Ok(())
}

/// Write a line chart PNG (1000x600): `title`, axis labels, one coloured line per series and a
/// legend of the named ones. Axis ranges come from the data with 5% padding; non-finite points
/// are skipped, as are series left with no points. With no points at all the image still
/// renders, saying "no data yet". Written atomically (temporary file, then rename to `path`).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    ensure_font()?;
    let clean: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (s.name.as_str(), pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let xr = padded_range(clean.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let yr = padded_range(clean.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    write_png_atomic(path, |tmp| {
        let root = BitMapBackend::new(tmp, LINE_CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        let (Some((x0, x1)), Some((y0, y1))) = (xr, yr) else {
            draw_no_data(&root, title)?;
            return root.present().map_err(de);
        };
        anyhow::ensure!(
            (x1 - x0).is_finite() && (y1 - y0).is_finite(),
            "data range too large to plot: x {x0}..{x1}, y {y0}..{y1}"
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 26))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(de)?;
        let x_fmt = |v: &f64| fmt_tick(*v, x0, x1);
        let y_fmt = |v: &f64| fmt_tick(*v, y0, y1);
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 18))
            .light_line_style(GRID)
            .max_light_lines(LIGHT_LINES)
            .draw()
            .map_err(de)?;
        let mut any_named = false;
        for (i, (name, pts)) in clean.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let marker = if pts.len() <= MARKER_MAX_POINTS { 3 } else { 0 };
            let line =
                LineSeries::new(pts.iter().copied(), color.stroke_width(2)).point_size(marker);
            let anno = chart.draw_series(line).map_err(de)?;
            if !name.is_empty() {
                any_named = true;
                anno.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
            }
        }
        if any_named {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.5))
                .label_font((FONT, 16))
                .draw()
                .map_err(de)?;
        }
        root.present().map_err(de)
    })
}

/// Train and validation loss from a metrics file (JSON lines): "train loss" of `(step, loss)`
/// and "val loss" of `(step, val_loss)`. Lines that are not JSON objects, or lack `step` or the
/// loss, are skipped.
fn read_loss_series(metrics_jsonl: &Path) -> Result<[Series; 2]> {
    let bytes = std::fs::read(metrics_jsonl)
        .with_context(|| format!("cannot read metrics {}", metrics_jsonl.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        let Some(step) = obj.get("step").and_then(|v| v.as_f64()) else {
            continue;
        };
        if let Some(loss) = obj.get("loss").and_then(|v| v.as_f64()) {
            train.push((step, loss));
        }
        if let Some(loss) = obj.get("val_loss").and_then(|v| v.as_f64()) {
            val.push((step, loss));
        }
    }
    Ok([
        Series::new("train loss", train),
        Series::new("val loss", val),
    ])
}

/// Plot a training run's loss curves: read `metrics_jsonl` (one JSON object per line; lines may
/// lack keys) and chart train loss (`"loss"`) and validation loss (`"val_loss"`) against
/// `"step"` into `png`, titled "`title`: loss". Malformed lines (a partly written last line,
/// say) are skipped, not errors; a file with no losses gives a "no data yet" image. A missing
/// or unreadable metrics file is an error.
pub fn loss_curve(metrics_jsonl: &Path, png: &Path, title: &str) -> Result<()> {
    let series = read_loss_series(metrics_jsonl)?;
    let title = format!("{title}: loss");
    line_chart(png, &title, "step", "loss (nats/token)", &series)
}

/// `(step, obj)` for every JSON-object line of a metrics file that has a `step` (malformed
/// lines are skipped).
fn read_metric_objects(
    metrics_jsonl: &Path,
) -> Result<Vec<(f64, serde_json::Map<String, serde_json::Value>)>> {
    let bytes = std::fs::read(metrics_jsonl)
        .with_context(|| format!("cannot read metrics {}", metrics_jsonl.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .filter_map(
            |line| match serde_json::from_str::<serde_json::Value>(line.trim()) {
                Ok(serde_json::Value::Object(obj)) => {
                    let step = obj.get("step").and_then(|v| v.as_f64())?;
                    Some((step, obj))
                }
                _ => None,
            },
        )
        .collect())
}

/// The stability diagnostics of a hyper-connection run (see `train/`): `amax_png` charts the
/// Amax gain magnitudes of the composite residual mapping `∏ H^res` against the step — forward
/// (max row sum) and backward (max column sum) gain of the full composite (up to the last
/// layer) and the maximum over all partial composites — and `grad_png` the gradient norm of
/// every transformer layer and the global one.
pub fn hc_stability(
    metrics_jsonl: &Path,
    amax_png: &Path,
    grad_png: &Path,
    title: &str,
) -> Result<()> {
    let objs = read_metric_objects(metrics_jsonl)?;
    let arr = |o: &serde_json::Map<String, serde_json::Value>, k: &str| -> Option<Vec<f64>> {
        Some(
            o.get(k)?
                .as_array()?
                .iter()
                .filter_map(|v| v.as_f64())
                .collect(),
        )
    };
    let mut amax: Vec<Series> = [
        "forward, full composite",
        "backward, full composite",
        "forward, max over layers",
        "backward, max over layers",
    ]
    .iter()
    .map(|n| Series::new(*n, vec![]))
    .collect();
    let mut grads: Vec<Series> = Vec::new();
    let mut global = Series::new("global", vec![]);
    for (step, o) in &objs {
        for (i, key) in ["hc_amax_fwd", "hc_amax_bwd"].iter().enumerate() {
            if let Some(v) = arr(o, key).filter(|v| !v.is_empty()) {
                amax[i].points.push((*step, *v.last().unwrap_or(&f64::NAN)));
                amax[i + 2]
                    .points
                    .push((*step, v.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
            }
        }
        if let Some(v) = arr(o, "layer_grad_norm") {
            for (l, g) in v.iter().enumerate() {
                if grads.len() <= l {
                    grads.push(Series::new(format!("layer {l}"), vec![]));
                }
                grads[l].points.push((*step, *g));
            }
        }
        if let Some(g) = o.get("grad_norm").and_then(|v| v.as_f64()) {
            global.points.push((*step, g));
        }
    }
    grads.push(global);
    line_chart(
        amax_png,
        &format!("{title}: Amax gain magnitude of the composite residual mapping"),
        "step",
        "gain (mean over tokens of sequence 0)",
        &amax,
    )?;
    line_chart(
        grad_png,
        &format!("{title}: gradient norm per layer (before clipping)"),
        "step",
        "gradient L2 norm",
        &grads,
    )
}

/// Write a bar chart PNG (800x500) of labelled values (step time per implementation, say):
/// one coloured bar per entry, its label below and its value printed above it (below, for a
/// negative value). The y axis always includes 0. A non-finite value gets no bar and prints
/// "n/a"; no bars at all gives a "no data yet" image. Written atomically, like [`line_chart`].
pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[(String, f64)]) -> Result<()> {
    ensure_font()?;
    write_png_atomic(path, |tmp| {
        let root = BitMapBackend::new(tmp, BAR_CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(de)?;
        if bars.is_empty() {
            draw_no_data(&root, title)?;
            return root.present().map_err(de);
        }
        let finite = || bars.iter().map(|b| b.1).filter(|v| v.is_finite());
        let lo = finite().fold(0.0f64, f64::min);
        let mut hi = finite().fold(0.0f64, f64::max);
        if hi == lo {
            hi = 1.0;
        }
        let span = hi - lo;
        anyhow::ensure!(span.is_finite(), "data range too large to plot: {lo}..{hi}");
        // Headroom for the value printed beyond each bar's end.
        let y0 = if lo < 0.0 { lo - 0.12 * span } else { 0.0 };
        let y1 = if hi > 0.0 {
            hi + 0.12 * span
        } else {
            0.05 * span
        };
        let n = bars.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 24))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..n as f64, y0..y1)
            .map_err(de)?;
        let y_fmt = |v: &f64| fmt_tick(*v, y0, y1);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(y_label)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 18))
            .light_line_style(GRID)
            .max_light_lines(LIGHT_LINES)
            .draw()
            .map_err(de)?;
        chart
            .draw_series(
                bars.iter()
                    .enumerate()
                    .filter(|(_, b)| b.1.is_finite())
                    .map(|(i, b)| {
                        let x = i as f64;
                        let color = PALETTE[i % PALETTE.len()];
                        Rectangle::new([(x + 0.15, 0.0), (x + 0.85, b.1)], color.filled())
                    }),
            )
            .map_err(de)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let v = b.1;
                let (text, at, dy, vpos) = if !v.is_finite() {
                    ("n/a".to_string(), 0.0, -4, VPos::Bottom)
                } else if v < 0.0 {
                    (fmt_value(v), v, 4, VPos::Top)
                } else {
                    (fmt_value(v), v, -4, VPos::Bottom)
                };
                EmptyElement::at((i as f64 + 0.5, at))
                    + Text::new(text, (0, dy), centered(15, HPos::Center, vpos))
            }))
            .map_err(de)?;
        // Category labels under the x axis, shrunk to fit their slot where needed.
        let slot = (chart.backend_coord(&(1.0, y0)).0 - chart.backend_coord(&(0.0, y0)).0).max(1);
        for (i, (label, _)) in bars.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, y0));
            let mut size = 15;
            while size > 9 {
                let (w, _) = root
                    .estimate_text_size(label, &TextStyle::from((FONT, size).into_font()))
                    .map_err(de)?;
                if (w as i32) < slot - 4 {
                    break;
                }
                size -= 1;
            }
            root.draw(&Text::new(
                label.clone(),
                (px, py + 8),
                centered(size, HPos::Center, VPos::Top),
            ))
            .map_err(de)?;
        }
        root.present().map_err(de)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

    /// A fresh, empty directory under the system temp dir.
    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "mnemo-plot-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(path: &Path) -> (u32, u32) {
        let b = std::fs::read(path).unwrap();
        assert!(b.len() > 33, "{} is too short for a PNG", path.display());
        assert_eq!(b[..8], PNG_SIGNATURE, "{} is not a PNG", path.display());
        assert_eq!(&b[12..16], b"IHDR");
        let be = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        (be(16), be(20))
    }

    /// The directory holds exactly `names` (no temporary files left behind).
    fn assert_only(dir: &Path, names: &[&str]) {
        let mut got: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn line_chart_writes_png_of_right_size() {
        let dir = temp_dir("line");
        let out = dir.join("chart.png");
        let a: Vec<(f64, f64)> = (0..200)
            .map(|i| (i as f64 * 10.0, 5.0 * (-(i as f64) / 60.0).exp() + 2.0))
            .collect();
        let mut b: Vec<(f64, f64)> = (0..20)
            .map(|i| (i as f64 * 100.0, 5.2 * (-(i as f64) / 6.0).exp() + 2.2))
            .collect();
        b.push((f64::NAN, 1.0));
        b.push((50.0, f64::INFINITY));
        let series = [Series::new("train", a), Series::new("val", b)];
        line_chart(&out, "test run", "step", "loss", &series).unwrap();
        assert_eq!(png_size(&out), LINE_CHART_SIZE);
        // Overwriting an existing chart works too.
        line_chart(&out, "test run", "step", "loss", &series[..1]).unwrap();
        assert_eq!(png_size(&out), LINE_CHART_SIZE);
        assert_only(&dir, &["chart.png"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn line_chart_without_data_still_writes_png() {
        let dir = temp_dir("empty");
        let out = dir.join("empty.png");
        line_chart(&out, "nothing", "x", "y", &[]).unwrap();
        assert_eq!(png_size(&out), LINE_CHART_SIZE);
        let only_nan = [Series::new("nan", vec![(f64::NAN, f64::NAN)])];
        line_chart(&out, "nothing", "x", "y", &only_nan).unwrap();
        assert_eq!(png_size(&out), LINE_CHART_SIZE);
        // A single point (zero span on both axes) is fine.
        line_chart(&out, "one", "x", "y", &[Series::new("p", vec![(3.0, 3.0)])]).unwrap();
        assert_eq!(png_size(&out), LINE_CHART_SIZE);
        assert_only(&dir, &["empty.png"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loss_curve_reads_metrics_and_skips_malformed_lines() {
        let dir = temp_dir("loss");
        let metrics = dir.join("metrics.jsonl");
        let mut f = std::fs::File::create(&metrics).unwrap();
        for step in 0..100 {
            let loss = 4.0 * (-(step as f64) / 30.0).exp() + 1.5;
            writeln!(f, r#"{{"step": {step}, "loss": {loss}, "lr": 0.001}}"#).unwrap();
            if step % 20 == 0 {
                writeln!(f, r#"{{"step": {step}, "val_loss": {}}}"#, loss + 0.1).unwrap();
            }
        }
        writeln!(f, "not json at all").unwrap();
        writeln!(f, "[1, 2, 3]").unwrap();
        writeln!(f, r#"{{"loss": 1.0}}"#).unwrap(); // no step
        writeln!(f, r#"{{"step": "7", "loss": 1.0}}"#).unwrap(); // step not a number
        writeln!(f, r#"{{"event": "checkpoint", "step": 100}}"#).unwrap(); // no loss
        write!(f, r#"{{"step": 100, "lo"#).unwrap(); // partly written last line
        drop(f);

        let [train, val] = read_loss_series(&metrics).unwrap();
        assert_eq!(train.points.len(), 100);
        assert_eq!(val.points.len(), 5);
        assert_eq!(val.points[1].0, 20.0);
        assert!((val.points[1].1 - (4.0 * (-20.0f64 / 30.0).exp() + 1.6)).abs() < 1e-9);

        let png = dir.join("loss.png");
        loss_curve(&metrics, &png, "tiny").unwrap();
        assert_eq!(png_size(&png), LINE_CHART_SIZE);
        assert_only(&dir, &["loss.png", "metrics.jsonl"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loss_curve_of_empty_metrics_is_still_a_png() {
        let dir = temp_dir("loss-empty");
        let metrics = dir.join("metrics.jsonl");
        std::fs::write(&metrics, b"").unwrap();
        let png = dir.join("loss.png");
        loss_curve(&metrics, &png, "fresh run").unwrap();
        assert_eq!(png_size(&png), LINE_CHART_SIZE);

        // A missing metrics file is an error that names it.
        let missing = dir.join("missing.jsonl");
        let err = loss_curve(&missing, &png, "x").unwrap_err();
        assert!(format!("{err:#}").contains("missing.jsonl"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bar_chart_writes_png_of_right_size() {
        let dir = temp_dir("bar");
        let out = dir.join("bars.png");
        let bars = vec![
            ("naive".to_string(), 812.5),
            ("blocked".to_string(), 203.25),
            ("gemm + rayon, fused attention".to_string(), 41.7),
            ("broken".to_string(), f64::NAN),
        ];
        bar_chart(&out, "step time", "ms / step", &bars).unwrap();
        assert_eq!(png_size(&out), BAR_CHART_SIZE);
        let mixed = vec![("up".to_string(), 2.0), ("down".to_string(), -1.5)];
        bar_chart(&out, "signed", "delta", &mixed).unwrap();
        assert_eq!(png_size(&out), BAR_CHART_SIZE);
        bar_chart(&out, "none", "ms", &[]).unwrap();
        assert_eq!(png_size(&out), BAR_CHART_SIZE);
        assert_only(&dir, &["bars.png"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writing_into_a_missing_directory_is_an_error_naming_the_path() {
        let dir = temp_dir("missing-dir");
        let out = dir.join("no-such-dir").join("chart.png");
        let err =
            line_chart(&out, "t", "x", "y", &[Series::new("a", vec![(0.0, 1.0)])]).unwrap_err();
        assert!(format!("{err:#}").contains("chart.png"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tick_and_value_formatting() {
        assert_eq!(fmt_tick(1000.0, 0.0, 5000.0), "1000");
        assert_eq!(fmt_tick(2.5, 1.0, 3.0), "2.5");
        assert_eq!(fmt_tick(2.25, 2.0, 2.5), "2.25");
        assert_eq!(fmt_tick(1e-17, -1.0, 1.0), "0");
        assert_eq!(fmt_tick(5e-5, 0.0, 3e-4), "0.00005");
        assert_eq!(fmt_tick(3e9, 0.0, 1e10), "3.00e9");
        assert_eq!(fmt_tick(1e9, 0.0, 1e10), "1.00e9");
        assert_eq!(fmt_value(812.5), "812.5");
        assert_eq!(fmt_value(41.7), "41.7");
        assert_eq!(fmt_value(1.5), "1.5");
        assert_eq!(fmt_value(-2.0), "-2");
        assert_eq!(fmt_value(1234.56), "1234.6");
        assert_eq!(fmt_value(0.012345), "0.012");
        assert_eq!(fmt_value(0.0), "0");
    }
}
