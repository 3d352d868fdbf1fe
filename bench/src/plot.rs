//! The benchmarks' figures, drawn with plotters as SVG next to their JSON.
//!
//! Most figures are one kind of chart, [`Figure`]: along the x axis categories (a measure, a
//! transport, a percentile), in each category one column per series (kernel, flowshift, …)
//! with every run's value as a point, the median as a bar and the min–max spread as a
//! whisker, and reference lines (a target, a ceiling). [`draw`] draws it; the benches build
//! their figures from their results JSON (`figures` in each bench module), so that
//! `flowshift-bench plot <results.json>` ([`redraw`]) draws exactly what the run drew.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

/// The kernel baseline's colour in every figure.
pub(crate) const KERNEL: RGBColor = RGBColor(255, 127, 14);
/// flowshift's colour in every figure.
pub(crate) const FLOWSHIFT: RGBColor = RGBColor(31, 119, 180);
/// Further series, in order.
pub(crate) const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
/// Reference lines (targets, ceilings).
pub(crate) const REFERENCE: [RGBColor; 3] = [
    RGBColor(60, 60, 60),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
];

/// The font of every caption.
pub(crate) const CAPTION: (&str, u32) = ("sans-serif", 18);

/// Legends in every figure look alike.
pub(crate) fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    at: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A white SVG canvas of `size` at `path`, handed to `f`, then written.
pub(crate) fn svg(
    path: &Path,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    f(&root).with_context(|| format!("drawing {}", path.display()))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A label formatter for a categorical axis at positions 0, 1, …: the name at each integer
/// position, nothing between.
pub(crate) fn category_label(names: &[String], x: f64) -> String {
    let i = x.round();
    match names.get(i as usize) {
        Some(n) if (x - i).abs() < 1e-6 && i >= 0.0 => n.clone(),
        _ => String::new(),
    }
}

/// A number in three significant digits or so, for axis labels.
pub(crate) fn short_number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}").trim_end_matches(".0").to_owned()
    } else if a >= 0.01 {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{v:.0e}")
    }
}

/// One series of a [`Figure`]: a value per run in each category (empty: the series has
/// nothing there).
#[derive(Debug, Clone, Default)]
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) colour: RGBColor,
    pub(crate) values: Vec<Vec<f64>>,
    /// Per category, the values to draw hollow (runs flagged for steal); empty: none.
    pub(crate) flagged: Vec<Vec<bool>>,
}

impl Series {
    fn is_flagged(&self, category: usize, run: usize) -> bool {
        self.flagged
            .get(category)
            .and_then(|f| f.get(run))
            .copied()
            .unwrap_or(false)
    }
}

/// A horizontal line at `y`, across the categories listed (all when empty).
#[derive(Debug, Clone)]
pub(crate) struct RefLine {
    pub(crate) label: String,
    pub(crate) y: f64,
    pub(crate) categories: Vec<usize>,
}

/// Points per run, the median and the min–max spread, per category and series.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub(crate) title: String,
    pub(crate) y_desc: String,
    /// Category names; `\n` breaks a name into lines.
    pub(crate) categories: Vec<String>,
    pub(crate) series: Vec<Series>,
    pub(crate) refs: Vec<RefLine>,
    /// Logarithmic y axis (values ≤ 0 are left out).
    pub(crate) log_y: bool,
    /// Join each series' medians from category to category (a curve, e.g. over loss rates).
    pub(crate) connect: bool,
}

impl Figure {
    /// The values that are drawn (finite, and positive on a log axis).
    fn shown(&self, v: f64) -> bool {
        v.is_finite() && (!self.log_y || v > 0.0)
    }

    /// Where the series with something in category `i` go: (series index, x).
    fn columns(&self, i: usize) -> Vec<(usize, f64)> {
        let present: Vec<usize> = (0..self.series.len())
            .filter(|&k| {
                self.series[k]
                    .values
                    .get(i)
                    .is_some_and(|v| v.iter().any(|&x| self.shown(x)))
            })
            .collect();
        let w = self.column_width(present.len());
        let m = present.len() as f64;
        present
            .iter()
            .enumerate()
            .map(|(j, &k)| (k, i as f64 + (j as f64 - (m - 1.0) / 2.0) * w))
            .collect()
    }

    fn column_width(&self, columns: usize) -> f64 {
        0.8 / columns.max(1) as f64
    }

    fn y_range(&self) -> Range<f64> {
        let values = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
            .chain(self.refs.iter().map(|r| r.y))
            .filter(|&v| self.shown(v));
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if self.log_y {
            if !lo.is_finite() {
                return 0.1..10.0;
            }
            // Room above for the legend.
            (lo / 2.0)..(hi * 8.0).max(lo * 10.0)
        } else if !hi.is_finite() || hi <= 0.0 {
            0.0..1.0
        } else {
            0.0..hi * 1.4
        }
    }
}

/// The median of the finite values of `v`.
fn median(v: &[f64]) -> Option<f64> {
    crate::stats::Spread::of(v.to_vec()).map(|s| s.median)
}

/// Draws `fig` as an SVG at `path`.
pub(crate) fn draw(path: &Path, fig: &Figure) -> anyhow::Result<()> {
    let n = fig.categories.len().max(1);
    let width = (180 * n as u32).clamp(700, 1400);
    svg(path, (width, 520), |root| {
        let y = fig.y_range();
        let x = -0.5..n as f64 - 0.5;
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(&fig.title, CAPTION)
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60);
        if fig.log_y {
            let chart = builder.build_cartesian_2d(x, y.log_scale())?;
            body(root, chart, fig)
        } else {
            let chart = builder.build_cartesian_2d(x, y)?;
            body(root, chart, fig)
        }
    })
}

/// The figure on a chart whose y axis is linear or logarithmic.
fn body<'a, Y>(
    root: &DrawingArea<SVGBackend<'a>, Shift>,
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    fig: &Figure,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let n = fig.categories.len();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(fig.y_desc.as_str())
        .y_label_formatter(&|v| short_number(*v))
        .draw()?;
    // Category names under the axis, centred on each category, line by line.
    let bottom = chart.y_range().start;
    for (i, name) in fig.categories.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, bottom));
        for (l, line) in name.lines().enumerate() {
            root.draw(&Text::new(
                line.to_owned(),
                (px, py + 8 + 15 * l as i32),
                ("sans-serif", 13).into_font().color(&BLACK).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Top,
                    ),
                ),
            ))?;
        }
    }
    // Reference lines first, so the data is drawn over them.
    for (r, line) in fig.refs.iter().enumerate() {
        let colour = REFERENCE[r % REFERENCE.len()];
        let spans: Vec<Range<f64>> = if line.categories.is_empty() {
            vec![-0.5..n as f64 - 0.5]
        } else {
            line.categories
                .iter()
                .map(|&i| i as f64 - 0.45..i as f64 + 0.45)
                .collect()
        };
        let style = colour.stroke_width(2);
        let mut anno = None;
        for s in spans {
            anno = Some(chart.draw_series(DashedLineSeries::new(
                [(s.start, line.y), (s.end, line.y)],
                6,
                4,
                style,
            ))?);
        }
        if let Some(anno) = anno {
            anno.label(line.label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
        }
    }
    let mut any_flagged = false;
    for (k, series) in fig.series.iter().enumerate() {
        let colour = series.colour;
        // (x, values, (value, flagged) per run) of this series' columns.
        type Column = (f64, Vec<f64>, Vec<(f64, bool)>);
        let columns: Vec<Column> = (0..n)
            .filter_map(|i| {
                let (_, x) = fig.columns(i).into_iter().find(|(s, _)| *s == k)?;
                let runs: Vec<(f64, bool)> = series.values[i]
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| fig.shown(**v))
                    .map(|(j, &v)| (v, series.is_flagged(i, j)))
                    .collect();
                Some((x, runs.iter().map(|r| r.0).collect(), runs))
            })
            .collect();
        any_flagged |= columns.iter().any(|c| c.2.iter().any(|r| r.1));
        let w = fig.column_width((0..n).map(|i| fig.columns(i).len()).max().unwrap_or(1));
        if fig.connect {
            chart.draw_series(LineSeries::new(
                columns
                    .iter()
                    .filter_map(|(x, v, _)| Some((*x, median(v)?))),
                colour.mix(0.6).stroke_width(1),
            ))?;
        }
        // Whiskers: min–max, with caps.
        for (x, v, _) in &columns {
            let (lo, hi) = v
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
                    (a.min(y), b.max(y))
                });
            let cap = w * 0.15;
            let style = colour.stroke_width(1);
            chart.draw_series([
                PathElement::new([(*x, lo), (*x, hi)], style),
                PathElement::new([(x - cap, lo), (x + cap, lo)], style),
                PathElement::new([(x - cap, hi), (x + cap, hi)], style),
            ])?;
        }
        // Every run's value, spread a little sideways so that equal values stay visible.
        // Flagged runs hollow.
        chart.draw_series(columns.iter().flat_map(|(x, _, runs)| {
            let m = runs.len() as f64;
            runs.iter().enumerate().map(move |(j, &(y, flagged))| {
                let dx = if m > 1.0 {
                    (j as f64 / (m - 1.0) - 0.5) * w * 0.4
                } else {
                    0.0
                };
                let style = if flagged {
                    colour.stroke_width(1)
                } else {
                    colour.mix(0.55).filled()
                };
                Circle::new((x + dx, y), 3, style)
            })
        }))?;
        // The median, labelled for the legend.
        chart
            .draw_series(columns.iter().filter_map(|(x, v, _)| {
                let m = median(v)?;
                Some(PathElement::new(
                    [(x - w * 0.35, m), (x + w * 0.35, m)],
                    colour.stroke_width(4),
                ))
            }))?
            .label(series.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 14, y + 4)], colour.filled()));
    }
    if any_flagged {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
            .label(FLAGGED)
            .legend(|(x, y)| Circle::new((x + 7, y), 3, BLACK.stroke_width(1)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// The legend of hollow points.
pub(crate) const FLAGGED: &str = "hollow point: run flagged (steal > 10 %)";

/// Which bench wrote a results JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bench {
    Throughput,
    Tunnel,
    Migrate,
}

impl Bench {
    /// Tells by the fields only each bench's results have.
    pub(crate) fn detect(v: &serde_json::Value) -> anyhow::Result<Bench> {
        let has = |k: &str| v.get(k).is_some();
        if has("kernel_tcp") && has("flowshift") {
            Ok(Bench::Throughput)
        } else if has("samples") && has("loss_percent") {
            Ok(Bench::Tunnel)
        } else if has("headlines") && has("runs") && has("interval_ms") {
            Ok(Bench::Migrate)
        } else if has("rows") && has("seeds") {
            bail!(
                "this is sim.json: `flowshift-bench sim` draws its figures itself (the \
                 utilisation traces are not in the JSON; it needs no root and takes seconds)"
            )
        } else if has("per_handoff") {
            bail!(
                "this is repair.json: the kernel baseline's figures are drawn by \
                 `flowshift-bench migrate` beside flowshift's"
            )
        } else {
            bail!("not a results JSON of flowshift-bench throughput, tunnel or migrate")
        }
    }

    /// Draws the figures of `v` into `dir`; returns the files written.
    pub(crate) fn figures(self, v: &serde_json::Value, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        match self {
            Bench::Throughput => crate::throughput::figures(v, dir),
            Bench::Tunnel => crate::tunnel::figures(v, dir),
            Bench::Migrate => crate::migrate::figures(v, dir),
        }
    }
}

/// Draws each figure into `dir` as `<name>.svg`; returns the paths.
pub(crate) fn draw_all(dir: &Path, figures: &[(&str, Figure)]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    figures
        .iter()
        .map(|(name, fig)| {
            let path = dir.join(format!("{name}.svg"));
            draw(&path, fig)?;
            Ok(path)
        })
        .collect()
}

/// After a run: the figures of `results` into `dir`. A figure that fails is reported and
/// does not fail the run (the JSON is written; `flowshift-bench plot` can redraw them).
pub(crate) fn after_run(bench: Bench, results: &impl Serialize, dir: &Path) {
    let drawn = serde_json::to_value(results)
        .map_err(anyhow::Error::from)
        .and_then(|v| bench.figures(&v, dir));
    match drawn {
        Ok(paths) => println!("drew {}", list(&paths)),
        Err(e) => eprintln!("could not draw the figures: {e:#}"),
    }
}

/// `flowshift-bench plot`: the figures of a saved results JSON, into `out` (default: next
/// to the JSON).
pub(crate) fn redraw(json: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let bench = Bench::detect(&v).with_context(|| json.display().to_string())?;
    let dir = match out {
        Some(d) => d.to_path_buf(),
        None => json
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    let paths = bench
        .figures(&v, &dir)
        .with_context(|| format!("drawing the figures of {}", json.display()))?;
    println!("drew {}", list(&paths));
    Ok(())
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowshift-plot-{}-{name}", std::process::id()));
        // FLOWSHIFT_KEEP_PLOTS=DIR: draw there and keep the files (to look at them).
        let d = std::env::var_os("FLOWSHIFT_KEEP_PLOTS").map_or(d, |k| PathBuf::from(k).join(name));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The file is an SVG that names every label in `labels`.
    pub(crate) fn assert_svg(path: &Path, labels: &[&str]) {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.len() > 500, "{} is nearly empty", path.display());
        assert!(text.contains("<svg"), "{} is not an SVG", path.display());
        for l in labels {
            // Text in an SVG is XML-escaped.
            let l = l
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            assert!(text.contains(&l), "{} lacks {l:?}", path.display());
        }
    }

    #[test]
    fn a_figure_with_log_axis_reference_lines_and_empty_columns() {
        let dir = temp_dir("figure");
        let fig = Figure {
            title: "test figure".into(),
            y_desc: "ms".into(),
            categories: vec!["first".into(), "second\nline".into()],
            series: vec![
                Series {
                    label: "alpha".into(),
                    colour: KERNEL,
                    values: vec![vec![1.0, 2.0, 3.0], vec![]],
                    ..Default::default()
                },
                Series {
                    label: "beta".into(),
                    colour: FLOWSHIFT,
                    values: vec![vec![0.5], vec![10.0, f64::NAN, 0.0, 20.0]],
                    flagged: vec![vec![], vec![false, false, false, true]],
                },
            ],
            refs: vec![RefLine {
                label: "target".into(),
                y: 5.0,
                categories: vec![1],
            }],
            log_y: true,
            connect: true,
        };
        let paths = draw_all(&dir, &[("fig", fig)]).unwrap();
        assert_svg(
            &paths[0],
            &[
                "test figure",
                "alpha",
                "beta",
                "target",
                "second",
                "line",
                FLAGGED,
            ],
        );
        assert_eq!(short_number(0.6), "0.6");
        assert_eq!(short_number(12.0), "12");
        assert_eq!(short_number(1500.0), "1500");
        if std::env::var_os("FLOWSHIFT_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn detects_the_bench_of_a_json() {
        let v = serde_json::json!({"kernel_tcp": [], "flowshift": []});
        assert_eq!(Bench::detect(&v).unwrap(), Bench::Throughput);
        let v = serde_json::json!({"samples": [], "loss_percent": 5});
        assert_eq!(Bench::detect(&v).unwrap(), Bench::Tunnel);
        let v = serde_json::json!({"headlines": [], "runs": [], "interval_ms": 600});
        assert_eq!(Bench::detect(&v).unwrap(), Bench::Migrate);
        assert!(Bench::detect(&serde_json::json!({"rows": [], "seeds": 5})).is_err());
        assert!(Bench::detect(&serde_json::json!({})).is_err());
    }
}
