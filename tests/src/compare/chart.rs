//! Grouped bar charts as plain SVG (no plotting dependency): one group per Service count, one
//! bar per datapath, optionally on a log scale.

use std::fmt::Write as _;

pub struct Chart {
    pub title: String,
    pub y_label: String,
    /// Group labels along the x axis (e.g. "10 Services").
    pub groups: Vec<String>,
    pub series: Vec<Series>,
    pub log_scale: bool,
}

/// One bar per group.
pub struct Series {
    pub name: String,
    /// `#rrggbb`; the same datapath keeps its colour across charts.
    pub color: String,
    /// One value per group; `None` for no bar.
    pub values: Vec<Option<f64>>,
    /// Per group: the value is only a lower bound (labelled `>`).
    pub lower_bound: Vec<bool>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Short number: 3 significant digits, k/M suffixes.
pub fn short(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e4 {
        return format!("{v:.0}");
    }
    let (v, suffix) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{suffix}")
}

/// Round-number ticks from 0 to at least `max`.
fn linear_ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let mut ticks = vec![0.0];
    while *ticks.last().unwrap_or(&0.0) < max {
        let next = ticks.len() as f64 * step;
        ticks.push(next);
    }
    ticks
}

pub fn render(chart: &Chart) -> String {
    let (width, height) = (760.0, 380.0);
    let (left, right, top, bottom) = (70.0, 160.0, 40.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let values: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .filter(|v| v.is_finite())
        .collect();
    let max = values.iter().copied().fold(0.0f64, f64::max);
    let positive_min = values
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    // Value -> y pixel, and the ticks to draw.
    let (ticks, lo, hi): (Vec<f64>, f64, f64) = if chart.log_scale && positive_min.is_finite() {
        let lo = positive_min.log10().floor();
        let hi = max.log10().ceil().max(lo + 1.0);
        let ticks = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
        (ticks, lo, hi)
    } else {
        let ticks = linear_ticks(max);
        let hi = *ticks.last().unwrap_or(&1.0);
        (ticks, 0.0, hi)
    };
    let y_of = |v: f64| -> f64 {
        let t = if chart.log_scale {
            (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)
        } else {
            v / hi
        };
        top + plot_h * (1.0 - t.clamp(0.0, 1.0))
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        left + plot_w / 2.0,
        escape(&chart.title)
    );
    for tick in &ticks {
        let y = y_of(*tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + 4.0,
            short(*tick)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        escape(&chart.y_label)
    );
    let groups = chart.groups.len().max(1) as f64;
    let group_w = plot_w / groups;
    let bars = chart.series.len().max(1) as f64;
    let bar_w = group_w * 0.8 / bars;
    for (g, label) in chart.groups.iter().enumerate() {
        let x0 = left + group_w * g as f64 + group_w * 0.1;
        for (s, series) in chart.series.iter().enumerate() {
            let Some(Some(v)) = series.values.get(g) else {
                continue;
            };
            let over = series.lower_bound.get(g).copied().unwrap_or(false);
            if !v.is_finite() {
                continue;
            }
            let x = x0 + bar_w * s as f64;
            let y = y_of(*v);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"#,
                bar_w * 0.92,
                (top + plot_h - y).max(0.0),
                series.color
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{}</text>"#,
                x + bar_w * 0.46,
                y - 3.0,
                if over {
                    format!("&gt;{}", short(*v))
                } else {
                    short(*v)
                }
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + group_w * (g as f64 + 0.5),
            top + plot_h + 20.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    for (s, series) in chart.series.iter().enumerate() {
        let y = top + 10.0 + 20.0 * s as f64;
        let x = left + plot_w + 15.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/>"#,
            y - 10.0,
            series.color
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{y:.1}">{}</text>"#,
            x + 18.0,
            escape(&series.name)
        );
    }
    if chart.log_scale {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="#666">log scale</text>"##,
            left + plot_w,
            top - 6.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bars_and_legend() {
        let series = |name: &str, values: Vec<Option<f64>>| Series {
            name: name.into(),
            color: "#123456".into(),
            lower_bound: vec![false, true],
            values,
        };
        let chart = Chart {
            title: "connections/s".into(),
            y_label: "per second".into(),
            groups: vec!["10".into(), "1000".into()],
            series: vec![
                series("none", vec![Some(100.0), Some(90.0)]),
                series("ours <&>", vec![Some(95.0), None]),
            ],
            log_scale: false,
        };
        let svg = render(&chart);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect").count(), 1 + 3 + 2);
        assert!(svg.contains("ours &lt;&amp;&gt;"));
        assert!(svg.contains(">&gt;90<"), "a lower bound is labelled");
        let log = render(&Chart {
            log_scale: true,
            ..chart
        });
        assert!(log.contains("log scale"));
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(12345.0), "12.3k");
        assert_eq!(short(0.5), "0.50");
        assert_eq!(short(29.3), "29.3");
        assert_eq!(short(250.0), "250");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(1.0), "1");
        assert_eq!(short(2_500_000.0), "2.50M");
        assert_eq!(linear_ticks(95.0), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
    }
}
