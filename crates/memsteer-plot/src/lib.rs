//! memsteer's figures: the profile heat map, the path with its bands, profile correlation matrices,
//! and the LM-Steer and HMM curves, for the CLI, xtask and (later) Python. Each is written as SVG and
//! PNG, atomically. Text uses the bundled DejaVu Sans.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Result, anyhow};
use memsteer_did::Profile;
use memsteer_did::compare::Correlation;
use plotters::coord::Shift;
use plotters::prelude::*;

/// `(1 − α)` as a percentage label: `95%` for α = 0.05, `97.5%` for α = 0.025.
pub fn level_label(alpha: f64) -> String {
    let pct = ((1.0 - alpha) * 100.0 * 1000.0).round() / 1000.0;
    format!("{pct}%")
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font("sans-serif", style, FONT).is_err() {
                eprintln!("warning: could not load the bundled font; figure text may be missing");
            }
        }
    });
}

/// Diverging red–blue scale (ColorBrewer RdBu, reversed so that positive = red): `v` in [−1, 1].
pub fn diverging(v: f64) -> RGBColor {
    const STOPS: [(f64, [u8; 3]); 7] = [
        (-1.0, [33, 102, 172]),
        (-0.66, [103, 169, 207]),
        (-0.33, [209, 229, 240]),
        (0.0, [247, 247, 247]),
        (0.33, [253, 219, 199]),
        (0.66, [239, 138, 98]),
        (1.0, [178, 24, 43]),
    ];
    let v = if v.is_finite() { v.clamp(-1.0, 1.0) } else { 0.0 };
    let i = STOPS.iter().position(|s| s.0 >= v).unwrap_or(STOPS.len() - 1).max(1);
    let (a, b) = (STOPS[i - 1], STOPS[i]);
    let t = (v - a.0) / (b.0 - a.0);
    let mix = |j: usize| (f64::from(a.1[j]) + t * (f64::from(b.1[j]) - f64::from(a.1[j]))).round() as u8;
    RGBColor(mix(0), mix(1), mix(2))
}

/// Draws a figure on an SVG and a PNG backend and writes both atomically.
macro_rules! with_backends {
    ($dir:expr, $name:expr, $size:expr, |$root:ident| $body:block) => {{
        register_font();
        let dir: &Path = $dir;
        let name: &str = $name;
        let size: (u32, u32) = $size;
        let mut files = Vec::new();
        let mut svg = String::new();
        {
            let $root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            let drawn: Result<()> = $body;
            drawn?;
            $root.present().map_err(|e| anyhow!("drawing {name}.svg: {e:?}"))?;
        }
        let svg_path = dir.join(format!("{name}.svg"));
        memsteer_panel::write_atomic(&svg_path, |w| w.write_all(svg.as_bytes()))
            .map_err(|e| anyhow!("writing {}: {e}", svg_path.display()))?;
        files.push(svg_path);
        let png_path = dir.join(format!("{name}.png"));
        // The encoder picks the format from the extension: the temporary name keeps `.png`.
        let mut tmp = memsteer_panel::durable::temp_path(&png_path).into_os_string();
        tmp.push(".png");
        let tmp = PathBuf::from(tmp);
        {
            let $root = BitMapBackend::new(&tmp, size).into_drawing_area();
            let drawn: Result<()> = $body;
            drawn?;
            $root.present().map_err(|e| anyhow!("drawing {name}.png: {e:?}"))?;
        }
        memsteer_panel::durable::commit(&tmp, &png_path).map_err(|e| anyhow!("writing {}: {e}", png_path.display()))?;
        files.push(png_path);
        Ok::<Vec<PathBuf>, anyhow::Error>(files)
    }};
}

/// The legend box every figure uses: upper right, translucent white.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    what: &str,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err(what))
}

fn err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {what}: {e:?}")
}

/// Writes `profile.svg/png` (heat map of significant cells) and `path.svg/png`.
/// Intervals and bands are labelled with their level `1 − alpha`.
pub fn profile_figures(profile: &Profile, dir: &Path, mark_step: Option<u64>, alpha: f64) -> Result<Vec<PathBuf>> {
    let level = level_label(alpha);
    let mut files =
        with_backends!(dir, "profile", (1000, 760), |root| { draw_profile(&root, profile, mark_step, &level) })?;
    files.extend(with_backends!(dir, "path", (1000, 560), |root| { draw_path(&root, profile, &level) })?);
    Ok(files)
}

/// Writes `correlations.svg/png`.
pub fn correlation_figures(labels: &[String], matrix: &[Correlation], dir: &Path) -> Result<Vec<PathBuf>> {
    with_backends!(dir, "correlations", (760, 680), |root| { draw_correlations(&root, labels, matrix) })
}

fn step_label(steps: &[u64], x: f64) -> String {
    let i = x.floor();
    if i < 0.0 || i as usize >= steps.len() {
        return String::new();
    }
    let s = steps[i as usize];
    if s >= 10_000 && s.is_multiple_of(1000) { format!("{}k", s / 1000) } else { s.to_string() }
}

fn draw_colorbar<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, vmax: f64, label: &str) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(60)
        .margin_bottom(70)
        .margin_right(10)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..1.0, -vmax..vmax)
        .map_err(err("colour bar"))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(label)
        .y_labels(7)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err("colour bar"))?;
    let n = 100;
    chart
        .draw_series((0..n).map(|i| {
            let lo = -vmax + 2.0 * vmax * i as f64 / n as f64;
            let hi = -vmax + 2.0 * vmax * (i + 1) as f64 / n as f64;
            Rectangle::new([(0.0, lo), (1.0, hi)], diverging((lo + hi) / (2.0 * vmax)).filled())
        }))
        .map_err(err("colour bar"))?;
    Ok(())
}

fn draw_profile<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    p: &Profile,
    mark_step: Option<u64>,
    level: &str,
) -> Result<()> {
    root.fill(&WHITE).map_err(err("profile"))?;
    let (main, bar) = root.split_horizontally(root.dim_in_pixel().0 - 110);
    let steps = &p.checkpoints;
    let c_len = steps.len() as f64;
    let g_min = p.cells.iter().map(|c| c.cohort_index).min().unwrap_or(0) as f64;
    let g_max = p.cells.iter().map(|c| c.cohort_index).max().unwrap_or(0) as f64 + 1.0;
    let sig: Vec<_> = p.cells.iter().filter(|c| c.is_significant()).collect();
    let vmax = sig.iter().map(|c| c.estimate.abs()).fold(0.0, f64::max).max(1e-12);
    let n_post = p.cells.iter().filter(|c| c.is_post()).count();
    let n_sig_post = sig.iter().filter(|c| c.is_post()).count();
    let mut chart = ChartBuilder::on(&main)
        .caption(
            format!(
                "Memorisation profile: {n_sig_post} of {n_post} post-treatment cells significant ({level} uniform band)"
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        // Cohorts run top to bottom, as in the paper's figures.
        .build_cartesian_2d(0.0..c_len, g_max..g_min)
        .map_err(err("profile"))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("checkpoint step")
        .y_desc("cohort (first checkpoint after training)")
        .x_labels(12)
        .y_labels(12)
        .x_label_formatter(&|x| step_label(steps, *x))
        .y_label_formatter(&|y| step_label(steps, *y))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(err("profile"))?;
    let grey = RGBColor(228, 228, 228);
    chart
        .draw_series(p.cells.iter().map(|c| {
            let x = c.checkpoint_index as f64;
            let y = c.cohort_index as f64;
            let fill = if c.is_significant() { diverging(c.estimate / vmax) } else { grey };
            Rectangle::new([(x, y), (x + 1.0, y + 1.0)], fill.filled())
        }))
        .map_err(err("profile"))?;
    // The diagonal c = g: where instantaneous memorisation sits.
    chart
        .draw_series(LineSeries::new([(g_min, g_min), (g_max, g_max)], BLACK.mix(0.35).stroke_width(1)))
        .map_err(err("profile"))?;
    if let Some(step) = mark_step {
        let x = steps.partition_point(|&s| s < step) as f64;
        chart
            .draw_series(DashedLineSeries::new([(x, g_min), (x, g_max)], 6, 4, BLACK.stroke_width(2)))
            .map_err(err("profile"))?
            .label(format!("step {step}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        legend(&mut chart, "profile")?;
    }
    draw_colorbar(&bar, vmax, "τ(g, c), log-prob")?;
    Ok(())
}

/// Whether every value lies on a whole number (strengths, event times, steps): such an axis gets whole
/// ticks only.
fn whole_axis(xs: impl IntoIterator<Item = f64>) -> bool {
    xs.into_iter().all(|x| (x - x.round()).abs() < 1e-9)
}

/// A tick label on a whole-number axis: the number at whole positions, nothing between them.
fn whole_label(x: &f64) -> String {
    // `+ 0.0` turns a rounded −0 into 0, so no "-0" tick.
    if (x - x.round()).abs() < 1e-6 { format!("{:.0}", x.round() + 0.0) } else { String::new() }
}

/// How many ticks a whole-number axis from `x0` to `x1` gets: one per value up to 13, fewer beyond.
fn whole_ticks(x0: f64, x1: f64) -> usize {
    // Clamped before the conversion: a huge or infinite span must not overflow.
    ((x1 - x0).round().clamp(0.0, 12.0) as usize + 1).max(2)
}

fn draw_path<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &Profile, level: &str) -> Result<()> {
    root.fill(&WHITE).map_err(err("path"))?;
    let path = &p.path;
    if path.is_empty() {
        return Ok(());
    }
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let e_min = path[0].event_time as f64 - 0.5;
    let e_max = path[path.len() - 1].event_time as f64 + 0.5;
    let lo = path.iter().map(|q| finite(q.band_lower.min(q.estimate))).fold(0.0, f64::min);
    let hi = path.iter().map(|q| finite(q.band_upper.max(q.estimate))).fold(0.0, f64::max);
    let pad = 0.05 * (hi - lo).max(1e-9);
    let mut chart = ChartBuilder::on(root)
        .caption("Memorisation path (cohort-size weighted, by event time)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(e_min..e_max, (lo - pad)..(hi + pad))
        .map_err(err("path"))?;
    chart
        .configure_mesh()
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .x_labels(whole_ticks(e_min, e_max))
        .x_desc("event time c − g (checkpoints since training)")
        .x_label_formatter(&whole_label)
        .y_desc("τ, log-probability")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(err("path"))?;
    let band_color = RGBColor(178, 24, 43);
    let polygon = |upper: &dyn Fn(&memsteer_did::PathEstimate) -> f64,
                   lower: &dyn Fn(&memsteer_did::PathEstimate) -> f64| {
        let mut pts: Vec<(f64, f64)> = path.iter().map(|q| (q.event_time as f64, finite(upper(q)))).collect();
        pts.extend(path.iter().rev().map(|q| (q.event_time as f64, finite(lower(q)))));
        pts
    };
    chart
        .draw_series(std::iter::once(Polygon::new(
            polygon(&|q| q.band_upper, &|q| q.band_lower),
            band_color.mix(0.15).filled(),
        )))
        .map_err(err("path"))?
        .label(format!("{level} uniform band"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], band_color.mix(0.15).filled()));
    chart
        .draw_series(std::iter::once(Polygon::new(
            polygon(&|q| q.ci_upper, &|q| q.ci_lower),
            band_color.mix(0.3).filled(),
        )))
        .map_err(err("path"))?
        .label(format!("{level} pointwise interval"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], band_color.mix(0.3).filled()));
    chart
        .draw_series(LineSeries::new([(e_min, 0.0), (e_max, 0.0)], BLACK.mix(0.5).stroke_width(1)))
        .map_err(err("path"))?;
    chart
        .draw_series(DashedLineSeries::new([(-0.5, lo - pad), (-0.5, hi + pad)], 5, 4, BLACK.mix(0.5).stroke_width(1)))
        .map_err(err("path"))?;
    chart
        .draw_series(LineSeries::new(
            path.iter().map(|q| (q.event_time as f64, finite(q.estimate))),
            band_color.stroke_width(2),
        ))
        .map_err(err("path"))?
        .label("estimate")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], band_color.stroke_width(2)));
    let dot = if path.len() <= 60 { 3 } else { 2 };
    chart
        .draw_series(
            path.iter().map(|q| Circle::new((q.event_time as f64, finite(q.estimate)), dot, band_color.filled())),
        )
        .map_err(err("path"))?;
    legend(&mut chart, "path")?;
    Ok(())
}

fn draw_correlations<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: &[String],
    m: &[Correlation],
) -> Result<()> {
    root.fill(&WHITE).map_err(err("correlations"))?;
    let n = labels.len();
    let (main, bar) = root.split_horizontally(root.dim_in_pixel().0 - 110);
    let mut chart = ChartBuilder::on(&main)
        .caption("Correlation of memorisation profiles", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..n as f64, n as f64..0.0)
        .map_err(err("correlations"))?;
    let name = |v: &f64| {
        let i = v.floor();
        if i >= 0.0 && (i as usize) < n && (v - i - 0.5).abs() < 0.26 {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(2 * n + 1)
        .y_labels(2 * n + 1)
        .x_label_formatter(&name)
        .y_label_formatter(&name)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err("correlations"))?;
    chart
        .draw_series((0..n * n).map(|k| {
            let (i, j) = ((k / n) as f64, (k % n) as f64);
            let fill = if m[k].r.is_finite() { diverging(m[k].r) } else { RGBColor(228, 228, 228) };
            Rectangle::new([(j, i), (j + 1.0, i + 1.0)], fill.filled())
        }))
        .map_err(err("correlations"))?;
    chart
        .draw_series((0..n * n).map(|k| {
            let (i, j) = ((k / n) as f64, (k % n) as f64);
            let text = if m[k].r.is_finite() { format!("{:.2}", m[k].r) } else { "n/a".into() };
            Text::new(text, (j + 0.38, i + 0.45), ("sans-serif", 15).into_font())
        }))
        .map_err(err("correlations"))?;
    draw_colorbar(&bar, 1.0, "Pearson r")?;
    Ok(())
}

/// Writes `NAME.svg/png`: the memorisation path of a synthetic run, true τ against the DiD estimate
/// (with its pointwise interval at level `1 − alpha`) and the difference estimator.
pub fn estimator_vs_truth_figures(
    dir: &Path,
    name: &str,
    title: &str,
    truth: &[(i64, f64)],
    did: &[memsteer_did::PathEstimate],
    difference: &[memsteer_did::PathEstimate],
    alpha: f64,
) -> Result<Vec<PathBuf>> {
    let level = level_label(alpha);
    with_backends!(dir, name, (1000, 560), |root| {
        draw_estimator_vs_truth(&root, title, truth, did, difference, &level)
    })
}

fn draw_estimator_vs_truth<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    truth: &[(i64, f64)],
    did: &[memsteer_did::PathEstimate],
    difference: &[memsteer_did::PathEstimate],
    level: &str,
) -> Result<()> {
    root.fill(&WHITE).map_err(err("estimator vs truth"))?;
    let all_e = truth.iter().map(|t| t.0).chain(did.iter().map(|p| p.event_time));
    let (e_min, e_max) = all_e.fold((i64::MAX, i64::MIN), |(a, b), e| (a.min(e), b.max(e)));
    if e_min > e_max {
        return Ok(());
    }
    let values = truth
        .iter()
        .map(|t| t.1)
        .chain(did.iter().flat_map(|p| [p.ci_lower, p.ci_upper]))
        .chain(difference.iter().map(|p| p.estimate))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let pad = 0.05 * (hi - lo).max(1e-9);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((e_min as f64 - 0.5)..(e_max as f64 + 0.5), (lo - pad)..(hi + pad))
        .map_err(err("estimator vs truth"))?;
    chart
        .configure_mesh()
        .light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .x_labels(whole_ticks(e_min as f64, e_max as f64))
        .x_desc("event time c − g (checkpoints since training)")
        .y_desc("τ, log-probability")
        .x_label_formatter(&whole_label)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(err("estimator vs truth"))?;
    let red = RGBColor(178, 24, 43);
    let blue = RGBColor(33, 102, 172);
    let mut band: Vec<(f64, f64)> = did.iter().map(|p| (p.event_time as f64, p.ci_upper)).collect();
    band.extend(did.iter().rev().map(|p| (p.event_time as f64, p.ci_lower)));
    chart
        .draw_series(std::iter::once(Polygon::new(band, red.mix(0.2).filled())))
        .map_err(err("estimator vs truth"))?
        .label(format!("DiD {level} interval"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], red.mix(0.2).filled()));
    chart
        .draw_series(LineSeries::new(did.iter().map(|p| (p.event_time as f64, p.estimate)), red.stroke_width(2)))
        .map_err(err("estimator vs truth"))?
        .label("difference-in-differences")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], red.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            difference.iter().map(|p| (p.event_time as f64, p.estimate)),
            blue.stroke_width(2),
        ))
        .map_err(err("estimator vs truth"))?
        .label("difference")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], blue.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(truth.iter().map(|&(e, t)| (e as f64, t)), BLACK.stroke_width(2)))
        .map_err(err("estimator vs truth"))?
        .label("true τ (counterfactual retraining)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.stroke_width(2)));
    chart
        .draw_series(truth.iter().map(|&(e, t)| Circle::new((e as f64, t), 3, BLACK.filled())))
        .map_err(err("estimator vs truth"))?;
    legend(&mut chart, "estimator vs truth")?;
    Ok(())
}

/// Writes `theorem2.svg/png`: next-token distributions under π, π' and the steered π-model.
pub fn theorem2_figures(dir: &Path, ill: &memsteer_hmm::theorem2::Illustration) -> Result<Vec<PathBuf>> {
    with_backends!(dir, "theorem2", (900, 520), |root| { draw_theorem2(&root, ill) })
}

fn draw_theorem2<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    ill: &memsteer_hmm::theorem2::Illustration,
) -> Result<()> {
    root.fill(&WHITE).map_err(err("theorem2"))?;
    let v = ill.under_pi.len();
    let top = ill.under_pi.iter().chain(&ill.under_pi2).chain(&ill.steered).copied().fold(0.0, f64::max) * 1.35;
    let prefix: Vec<String> = ill.prefix.iter().map(|o| o.to_string()).collect();
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Theorem 2: next token after [{}]", prefix.join(" ")), ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..v as f64, 0.0..top.max(1e-9))
        .map_err(err("theorem2"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * v + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 0.26 && i >= 0.0 { format!("symbol {}", i as usize) } else { String::new() }
        })
        .y_desc("P(next token)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(err("theorem2"))?;
    let series: [(&str, &[f64], RGBColor, f64); 3] = [
        ("start π", &ill.under_pi, RGBColor(150, 150, 150), 0.12),
        ("start π'", &ill.under_pi2, RGBColor(33, 102, 172), 0.38),
        ("start π, embeddings W e_v", &ill.steered, RGBColor(178, 24, 43), 0.64),
    ];
    for (label, probs, color, offset) in series {
        chart
            .draw_series(probs.iter().enumerate().map(|(i, &p)| {
                let x0 = i as f64 + offset;
                Rectangle::new([(x0, 0.0), (x0 + 0.24, p)], color.filled())
            }))
            .map_err(err("theorem2"))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.filled()));
    }
    legend(&mut chart, "theorem2")?;
    Ok(())
}

/// Writes `learned-steer.svg/png`: KL to the π' process of the learned steer against training samples.
pub fn learned_steer_figures(dir: &Path, curve: &[memsteer_hmm::theorem2::LearnedSteer]) -> Result<Vec<PathBuf>> {
    with_backends!(dir, "learned-steer", (900, 520), |root| { draw_learned(&root, curve) })
}

fn draw_learned<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curve: &[memsteer_hmm::theorem2::LearnedSteer],
) -> Result<()> {
    root.fill(&WHITE).map_err(err("learned steer"))?;
    if curve.is_empty() {
        return Ok(());
    }
    let xs: Vec<f64> = curve.iter().map(|p| p.samples as f64).collect();
    let (x0, x1) = (xs[0] * 0.8, xs[xs.len() - 1] * 1.25);
    let kls: Vec<f64> = curve.iter().map(|p| p.tv.max(1e-6)).collect();
    let y_hi = kls.iter().copied().fold(curve[0].tv_unsteered, f64::max) * 2.0;
    let y_lo = kls.iter().copied().fold(f64::INFINITY, f64::min) / 2.0;
    let mut chart = ChartBuilder::on(root)
        .caption("Learned steer: distance to the π' process vs training samples", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d((x0..x1).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(err("learned steer"))?;
    chart
        .configure_mesh()
        .x_desc("training sequences from π' (20 tokens each)")
        .y_desc("mean total variation to P_π', held-out contexts")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.3}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(err("learned steer"))?;
    let red = RGBColor(178, 24, 43);
    chart
        .draw_series(LineSeries::new(xs.iter().copied().zip(kls.iter().copied()), red.stroke_width(2)))
        .map_err(err("learned steer"))?
        .label("learned W (LM-Steer objective)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], red.stroke_width(2)));
    chart
        .draw_series(xs.iter().zip(&kls).map(|(&x, &y)| Circle::new((x, y), 4, red.filled())))
        .map_err(err("learned steer"))?;
    let u = curve[0].tv_unsteered;
    chart
        .draw_series(DashedLineSeries::new([(x0, u), (x1, u)], 6, 4, BLACK.mix(0.6).stroke_width(2)))
        .map_err(err("learned steer"))?
        .label("no steer (start π)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.6).stroke_width(2)));
    legend(&mut chart, "learned steer")?;
    Ok(())
}

/// Writes the continuous-control figure of `steer eval` (an SVG at `path`): mean style score against
/// strength, each point `(strength, mean, standard deviation)` with a ±1 sd bar.
pub fn steer_eval_figure(path: &Path, points: &[(f64, f64, f64)], y_desc: &str) -> Result<()> {
    register_font();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 520)).into_drawing_area();
        draw_steer_eval(&root, points, y_desc)?;
        root.present().map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    }
    memsteer_panel::write_atomic(path, |w| w.write_all(svg.as_bytes()))
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

fn draw_steer_eval<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    points: &[(f64, f64, f64)],
    y_desc: &str,
) -> Result<()> {
    root.fill(&WHITE).map_err(err("steer eval"))?;
    let mut pts = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    if pts.is_empty() {
        return Ok(());
    }
    let (xmin, xmax) = (pts[0].0, pts[pts.len() - 1].0);
    let pad = ((xmax - xmin) * 0.08).max(0.5);
    let lo = pts.iter().map(|p| p.1 - p.2).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1 + p.2).fold(f64::NEG_INFINITY, f64::max);
    let ypad = ((hi - lo) * 0.08).max(0.05);
    let mut chart = ChartBuilder::on(root)
        .caption("Continuous control: style score against steer strength", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((xmin - pad)..(xmax + pad), (lo - ypad)..(hi + ypad))
        .map_err(err("steer eval"))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .x_desc("steer strength")
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15));
    if whole_axis(pts.iter().map(|p| p.0)) {
        mesh.x_labels(whole_ticks(xmin, xmax)).x_label_formatter(&whole_label);
    }
    mesh.draw().map_err(err("steer eval"))?;
    let blue = RGBColor(33, 102, 172);
    chart
        .draw_series(
            pts.iter().map(|&(x, m, s)| PathElement::new([(x, m - s), (x, m + s)], blue.mix(0.5).stroke_width(2))),
        )
        .map_err(err("steer eval"))?;
    chart
        .draw_series(LineSeries::new(pts.iter().map(|&(x, m, _)| (x, m)), blue.stroke_width(2)))
        .map_err(err("steer eval"))?
        .label("mean score (bars: ±1 sd over samples)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], blue.stroke_width(2)));
    chart.draw_series(pts.iter().map(|&(x, m, _)| Circle::new((x, m), 4, blue.filled()))).map_err(err("steer eval"))?;
    legend(&mut chart, "steer eval")?;
    Ok(())
}

/// One line of a [`series_figure`]: a label and points `(x, y, half-width of the y interval)`.
pub type Series = (String, Vec<(f64, f64, f64)>);

/// A line figure of several labelled series with interval bars, written as `dir/name.svg` and
/// `dir/name.png` (for figures assembled from several runs, such as `cargo xtask reproduce trained`).
pub fn series_figure(
    dir: &Path,
    name: &str,
    title: &str,
    descs: (&str, &str),
    series: &[Series],
) -> Result<Vec<PathBuf>> {
    with_backends!(dir, name, (900, 560), |root| { draw_series(&root, title, descs, series) })
}

fn draw_series<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
) -> Result<()> {
    root.fill(&WHITE).map_err(err(title))?;
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    let finite = |q: &&(f64, f64, f64)| q.0.is_finite() && q.1.is_finite() && q.2.is_finite();
    for &(x, y, h) in series.iter().flat_map(|s| s.1.iter()).filter(finite) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y - h);
        y1 = y1.max(y + h);
    }
    if !(x0.is_finite() && y0.is_finite() && x1.is_finite() && y1.is_finite()) {
        return Err(anyhow!("{title}: no finite points to draw"));
    }
    let xpad = ((x1 - x0) * 0.05).max(1e-9);
    let ypad = ((y1 - y0.min(0.0)) * 0.08).max(1e-9);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0.min(0.0) - ypad)..(y1 + ypad))
        .map_err(err(title))?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(BLACK.mix(0.05))
        .bold_line_style(BLACK.mix(0.12))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15));
    if whole_axis(series.iter().flat_map(|s| s.1.iter()).filter(finite).map(|p| p.0)) {
        mesh.x_labels(whole_ticks(x0, x1)).x_label_formatter(&whole_label);
    }
    mesh.draw().map_err(err(title))?;
    let palette = [RGBColor(33, 102, 172), RGBColor(178, 24, 43), RGBColor(27, 120, 55), RGBColor(118, 42, 131)];
    for (i, (label, points)) in series.iter().enumerate() {
        let c = palette[i % palette.len()];
        // Points with a non-finite coordinate or interval are left out, not drawn off the axes.
        let mut p: Vec<(f64, f64, f64)> = points.iter().filter(finite).copied().collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(
                p.iter().map(|&(x, y, h)| PathElement::new([(x, y - h), (x, y + h)], c.mix(0.45).stroke_width(2))),
            )
            .map_err(err(title))?;
        chart
            .draw_series(LineSeries::new(p.iter().map(|&(x, y, _)| (x, y)), c.stroke_width(2)))
            .map_err(err(title))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(p.iter().map(|&(x, y, _)| Circle::new((x, y), 3, c.filled()))).map_err(err(title))?;
    }
    legend(&mut chart, title)
}

#[cfg(test)]
mod axis_tests {
    use super::*;

    #[test]
    fn whole_axes_get_whole_ticks_only() {
        assert!(whole_axis([-4.0, 0.0, 2.0]) && !whole_axis([0.5, 1.0]));
        assert_eq!(
            (whole_label(&3.0), whole_label(&-2.0000001), whole_label(&0.5)),
            ("3".into(), "-2".into(), String::new())
        );
        assert_eq!((whole_ticks(-4.0, 4.0), whole_ticks(0.0, 100.0), whole_ticks(1.0, 1.0)), (9, 13, 2));
        assert_eq!(
            (whole_ticks(0.0, f64::INFINITY), whole_ticks(0.0, 1e30), whole_label(&-1e-9)),
            (13, 13, "0".into())
        );
    }
}
