//! A dependency-free SVG line chart: throughput and lag over time.

use std::fmt::Write;

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Stroke colour (CSS).
    pub color: &'static str,
    /// (seconds since start, value) points.
    pub points: Vec<(f64, f64)>,
    /// Plot on the right axis instead of the left one.
    pub right_axis: bool,
}

fn max_of(series: &[&Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
}

/// The plot area of a chart: its size, margins and the scales of its axes.
#[derive(Clone, Copy)]
struct Frame {
    w: f64,
    h: f64,
    ml: f64,
    mt: f64,
    pw: f64,
    ph: f64,
    t_max: f64,
    l_max: f64,
    /// `None` without series on the right axis.
    r_max: Option<f64>,
}

/// Renders `series` as an SVG document of 960x420 px with a title and axis labels.
pub fn render(title: &str, left_label: &str, right_label: &str, series: &[Series]) -> String {
    let (w, h, ml, mr, mt, mb) = (960.0, 420.0, 70.0, 70.0, 40.0, 50.0);
    let left: Vec<&Series> = series.iter().filter(|s| !s.right_axis).collect();
    let right: Vec<&Series> = series.iter().filter(|s| s.right_axis).collect();
    let frame = Frame {
        w,
        h,
        ml,
        mt,
        pw: w - ml - mr,
        ph: h - mt - mb,
        t_max: series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .fold(0.0_f64, f64::max)
            .max(1.0),
        l_max: max_of(&left) * 1.1,
        r_max: (!right.is_empty()).then(|| max_of(&right) * 1.1),
    };
    let mut svg = svg_open(w, h, title);
    axes(&mut svg, &frame, left_label, right_label);
    for (k, s) in series.iter().enumerate() {
        line(&mut svg, &frame, k, s);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The frame, grid, tick labels and axis titles of a line chart.
fn axes(svg: &mut String, f: &Frame, left_label: &str, right_label: &str) {
    let Frame {
        w,
        h,
        ml,
        mt,
        pw,
        ph,
        t_max,
        l_max,
        r_max,
    } = *f;
    let _ = writeln!(
        svg,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let y = mt + ph - ph * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text><text x="{}" y="{:.1}">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            fmt_num(l_max * f64::from(i) / 4.0),
            ml + pw + 6.0,
            y + 4.0,
            r_max
                .map(|r| fmt_num(r * f64::from(i) / 4.0))
                .unwrap_or_default()
        );
        let x = ml + pw * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{x:.1}" y="{}" text-anchor="middle">{:.1}s</text>"##,
            mt + ph + 18.0,
            t_max * f64::from(i) / 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" transform="rotate(90 {:.1} {:.1})" text-anchor="middle">{}</text><text x="{:.1}" y="{}" text-anchor="middle">time since start</text>"##,
        mt + ph / 2.0,
        mt + ph / 2.0,
        escape(left_label),
        w - 14.0,
        mt + ph / 2.0,
        w - 14.0,
        mt + ph / 2.0,
        escape(right_label),
        ml + pw / 2.0,
        h - 10.0
    );
}

/// Series `s`, the `k`-th, as a polyline with its legend entry (dashed on the right axis).
fn line(svg: &mut String, f: &Frame, k: usize, s: &Series) {
    let max = if s.right_axis {
        f.r_max.unwrap_or(1.0)
    } else {
        f.l_max
    };
    let pts: Vec<String> = s
        .points
        .iter()
        .map(|(t, v)| {
            format!(
                "{:.1},{:.1}",
                f.ml + f.pw * t / f.t_max,
                f.mt + f.ph - f.ph * (v / max).min(1.0)
            )
        })
        .collect();
    let dash = if s.right_axis {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    };
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
        s.color,
        pts.join(" ")
    );
    let ly = f.mt + 14.0 + 16.0 * k as f64;
    let _ = writeln!(
        svg,
        r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
        f.ml + 10.0,
        f.ml + 30.0,
        s.color,
        f.ml + 36.0,
        ly + 4.0,
        escape(&s.label)
    );
}

/// One panel of a grouped bar chart: per group, one value per series (None: not measured).
#[derive(Debug, Clone)]
pub struct BarPanel {
    /// Panel title.
    pub title: String,
    /// `values[group][series]`.
    pub values: Vec<Vec<Option<f64>>>,
    /// Unit appended to the value printed above each bar.
    pub unit: String,
}

const BAR_COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];

/// Renders panels of grouped bars on a log scale (values that differ by 50× stay readable),
/// one group per label in `groups`, one bar per series with its value written above it.
pub fn render_bars(title: &str, series: &[&str], groups: &[String], panels: &[BarPanel]) -> String {
    let (w, ml, mr, panel_h, gap, top) = (960.0, 70.0, 20.0, 260.0, 70.0, 60.0);
    let h = top + panels.len() as f64 * (panel_h + gap);
    let pw = w - ml - mr;
    let mut svg = svg_open(w, h, title);
    for (k, name) in series.iter().enumerate() {
        let x = ml + 140.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="34" width="14" height="12" fill="{}"/><text x="{:.1}" y="45">{}</text>"#,
            BAR_COLORS[k % BAR_COLORS.len()],
            x + 20.0,
            escape(name)
        );
    }
    for (pi, panel) in panels.iter().enumerate() {
        let area = Area {
            x0: ml,
            y0: top + pi as f64 * (panel_h + gap) + 20.0,
            w: pw,
            h: panel_h - 20.0,
        };
        bar_panel(&mut svg, area, panel, series.len(), groups);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Where a bar panel is drawn.
#[derive(Clone, Copy)]
struct Area {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

/// The decades (powers of ten) a log scale for `panel`'s measured values spans.
fn decades(panel: &BarPanel) -> (f64, f64) {
    let vals: Vec<f64> = panel
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    if vals.is_empty() {
        return (0.0, 1.0);
    }
    let lo = vals
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = vals.iter().copied().fold(0.0_f64, f64::max).log10().ceil();
    (lo, hi.max(lo + 1.0))
}

/// One panel: its title, frame and log grid, then per group its label and bars.
fn bar_panel(svg: &mut String, a: Area, panel: &BarPanel, series: usize, groups: &[String]) {
    let Area { x0, y0, w, h } = a;
    let (lo, hi) = decades(panel);
    let y_of = |v: f64| y0 + h - h * ((v.log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    let _ = writeln!(
        svg,
        r##"<text x="{x0}" y="{:.1}" font-size="13">{}</text><rect x="{x0}" y="{y0:.1}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##,
        y0 - 6.0,
        escape(&panel.title)
    );
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let y = y_of(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + w,
            x0 - 6.0,
            y + 4.0,
            fmt_num(v)
        );
        d += 1.0;
    }
    let gw = w / groups.len().max(1) as f64;
    let bw = (gw * 0.8 / series.max(1) as f64).min(60.0);
    for (gi, label) in groups.iter().enumerate() {
        let gx = x0 + gw * gi as f64 + (gw - bw * series as f64) / 2.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + gw * (gi as f64 + 0.5),
            y0 + h + 16.0,
            escape(label)
        );
        for (si, v) in panel.values.get(gi).into_iter().flatten().enumerate() {
            let x = gx + bw * si as f64;
            match v {
                Some(v) if *v > 0.0 && v.is_finite() => {
                    let y = y_of(*v);
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}{}</text>"#,
                        bw - 2.0,
                        (y0 + h - y).max(0.0),
                        BAR_COLORS[si % BAR_COLORS.len()],
                        x + bw / 2.0,
                        y - 3.0,
                        fmt_num(*v),
                        escape(&panel.unit)
                    );
                }
                _ => {
                    let _ = writeln!(
                        svg,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">n/a</text>"#,
                        x + bw / 2.0,
                        y0 + h - 3.0
                    );
                }
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The start of a chart: the SVG root, a white page and the centred title.
fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"##,
        w / 2.0,
        escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_its_points() {
        let svg = render(
            "t <1>",
            "events/s",
            "lag s",
            &[
                Series {
                    label: "published".into(),
                    color: "#1f77b4",
                    points: vec![(0.0, 0.0), (1.0, 100.0), (2.0, 50.0)],
                    right_axis: false,
                },
                Series {
                    label: "lag".into(),
                    color: "#d62728",
                    points: vec![(0.0, 0.5), (2.0, 1.5)],
                    right_axis: true,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains(">published<") && svg.contains(">lag<"));
    }

    #[test]
    fn bars_show_every_measured_value_and_mark_the_missing() {
        let svg = render_bars(
            "t",
            &["ordo", "seed"],
            &["hot".into(), "churn".into()],
            &[BarPanel {
                title: "events/s".into(),
                values: vec![vec![Some(466.0), Some(9.2)], vec![Some(3200.0), None]],
                unit: "/s".into(),
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Three bars plus two legend swatches and the panel frame.
        assert_eq!(svg.matches("<rect").count(), 1 + 2 + 1 + 3);
        assert!(svg.contains(">466/s<") && svg.contains(">9.20/s<") && svg.contains(">3200/s<"));
        assert!(svg.contains(">n/a<") && svg.contains(">churn<"));
    }
}
