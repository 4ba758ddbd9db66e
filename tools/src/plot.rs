//! `--plot FILE.svg`: latency against percentile, one line per namespace and core.
//!
//! The x axis is the "nines" scale: `-log10(1 - p)`, so 0 %, 90 %, 99 %, 99.9 %, 99.99 % and
//! 99.999 % are evenly spaced and the tail gets as much room as the body. The y axis is
//! latency in microseconds, linear from zero with round tick values. Each line samples the
//! latency histogram at 251 points along the x axis. The SVG is self-contained (no scripts,
//! no external fonts) and opens in any browser.

use crate::stats::NsStats;
use std::fmt::Write as _;

/// The largest x value: 99.999 %.
pub const MAX_NINES: f64 = 5.0;

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text, e.g. `EMULATED (inline) NSID 1, core 0`.
    pub label: String,
    /// `(nines, µs)` points, nines from 0 to [`MAX_NINES`].
    pub points: Vec<(f64, f64)>,
}

/// Percentile (a fraction) to nines: `0.99` → `2`.
pub fn nines(p: f64) -> f64 {
    -(1.0 - p).max(1e-12).log10()
}

/// The line of `s`'s latency histogram, or `None` without one or without I/O.
pub fn series(label: &str, s: &NsStats, hz: u64) -> Option<Series> {
    let h = s.histogram.as_ref().filter(|h| !h.is_empty())?;
    let steps = 250;
    let points = (0..=steps)
        .map(|i| {
            let x = MAX_NINES * i as f64 / steps as f64;
            let q = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(q) as f64 * 1e6 / hz as f64)
        })
        .collect();
    Some(Series {
        label: label.to_string(),
        points,
    })
}

/// A round step for about `n` ticks up to `max`: 1, 2 or 5 times a power of ten.
pub fn nice_step(max: f64, n: u32) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let raw = max / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Escapes text for XML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let d = (-step.log10()).ceil() as usize;
        format!("{v:.d$}")
    }
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// The chart as an SVG document.
pub fn svg(title: &str, series: &[Series]) -> String {
    let (w, h) = (960.0, 560.0);
    let (left, right, top, bottom) = (90.0, 300.0, 60.0, 80.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let ymax_data = ys().fold(0.0f64, f64::max);
    let ymin_data = ys().filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    // A logarithmic latency axis when the tail is far above the body, so both stay visible.
    let log = ymin_data < f64::MAX && ymax_data / ymin_data > 30.0;
    let (ylo, yhi, ticks): (f64, f64, Vec<f64>) = if log {
        let lo = 10f64.powf(ymin_data.log10().floor());
        let hi = 10f64.powf(ymax_data.log10().ceil());
        let mut t = Vec::new();
        let mut dec = lo;
        while dec < hi * 1.001 {
            for m in [1.0, 2.0, 5.0] {
                if dec * m <= hi * 1.001 {
                    t.push(dec * m);
                }
            }
            dec *= 10.0;
        }
        (lo, hi, t)
    } else {
        let step = nice_step(ymax_data.max(1e-3), 6);
        let hi = (ymax_data / step).ceil().max(1.0) * step;
        let n = (hi / step).round() as u32;
        (0.0, hi, (0..=n).map(|i| i as f64 * step).collect())
    };
    let step = if log {
        1.0
    } else {
        ticks.get(1).copied().unwrap_or(1.0)
    };
    let x = |n: f64| left + pw * n / MAX_NINES;
    let y = |v: f64| {
        let f = if log {
            (v.max(ylo).log10() - ylo.log10()) / (yhi.log10() - ylo.log10())
        } else {
            (v - ylo) / (yhi - ylo)
        };
        top + ph - ph * f
    };

    let mut o = String::new();
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(
        o,
        r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="32" font-size="18" font-weight="bold" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    // Grid and x ticks.
    let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
    for (i, l) in labels.iter().enumerate() {
        let xx = x(i as f64);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{top:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#dddddd" stroke-width="1"/>"##,
            top + ph
        );
        let _ = writeln!(
            o,
            r#"<text x="{xx:.1}" y="{:.1}" font-size="13" text-anchor="middle">{l}</text>"#,
            top + ph + 20.0
        );
    }
    for &v in &ticks {
        let yy = y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#dddddd" stroke-width="1"/>"##,
            left + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="end">{}</text>"#,
            left - 8.0,
            yy + 4.5,
            fmt_tick(v, if log { v } else { step })
        );
    }
    // Axes.
    let _ = writeln!(
        o,
        r#"<rect x="{left:.1}" y="{top:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black" stroke-width="1"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" font-size="14" text-anchor="middle">Percentile (log scale of nines)</text>"#,
        left + pw / 2.0,
        h - 25.0
    );
    let _ = writeln!(
        o,
        r#"<text x="22" y="{:.1}" font-size="14" text-anchor="middle" transform="rotate(-90 22 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        if log {
            "Latency (µs, log scale)"
        } else {
            "Latency (µs)"
        }
    );
    // Lines and legend.
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut d = String::new();
        for (j, &(px, py)) in s.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                x(px),
                y(py)
            );
        }
        let _ = writeln!(
            o,
            r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="2"/>"#
        );
        let ly = top + 10.0 + 22.0 * i as f64;
        let lx = left + pw + 20.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    if series.is_empty() {
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" font-size="16" text-anchor="middle">no I/O completed</text>"#,
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small XML well-formedness check: balanced tags, quoted attributes, escaped text.
    pub(crate) fn well_formed(doc: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if text.contains('>') {
                return Err(format!("stray '>' in {text:?}"));
            }
            for (k, _) in text.match_indices('&') {
                let t = &text[k..];
                if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| t.starts_with(e))
                {
                    return Err(format!("bad entity in {text:?}"));
                }
            }
            let end = rest[i..].find('>').ok_or("unterminated tag")? + i;
            let tag = &rest[i + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
                continue;
            }
            if tag.matches('"').count() % 2 != 0 {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            let name = tag
                .split_whitespace()
                .next()
                .ok_or("empty tag")?
                .trim_end_matches('/');
            if !tag.ends_with('/') {
                stack.push(name.to_string());
            }
        }
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok(())
    }

    #[test]
    fn nines_scale() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert!(nines(1.0).is_finite());
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(7.0, 6), 2.0);
        assert_eq!(nice_step(0.3, 6), 0.05);
        assert_eq!(nice_step(0.0, 6), 1.0);
    }

    #[test]
    fn svg_is_well_formed() {
        let mut a = NsStats::new(1_000_000_000, true);
        for i in 1..=10_000u64 {
            a.record(1000 + i * i / 100);
        }
        let s = series("EMULATED (inline) NSID 1, core 0 <&>", &a, 1_000_000_000).unwrap();
        assert_eq!(s.points.len(), 251);
        assert!(s.points.windows(2).all(|w| w[0].1 <= w[1].1), "monotonic");
        let doc = svg("randread -q 4 -o 4096 & more", &[s.clone(), s]);
        well_formed(&doc).unwrap();
        assert!(doc.contains("99.999%"));
        assert!(doc.contains("Latency (µs"));
        assert!(doc.contains("&lt;&amp;&gt;"));
        well_formed(&svg("empty", &[])).unwrap();
        assert!(series("x", &NsStats::new(1000, true), 1000).is_none());
        assert!(well_formed("<a><b></a>").is_err());
        assert!(well_formed("<a>x & y</a>").is_err());
    }

    /// Writes a sample chart for a person to look at: `DIOXIDE_PLOT_SAMPLE=/tmp/x.svg cargo
    /// test -p dioxide-tools sample_plot -- --ignored`.
    #[test]
    #[ignore]
    fn sample_plot() {
        let hz = 1_000_000_000;
        let mut series_v = Vec::new();
        let mut rng = crate::workload::XorShift64::new(3);
        for (core, base) in [(0u32, 8_000u64), (1, 11_000)] {
            for nsid in 1..=2u32 {
                let mut a = NsStats::new(hz, true);
                for _ in 0..200_000 {
                    let r = rng.below(1000);
                    let tail = if r < 990 {
                        rng.below(4_000)
                    } else {
                        rng.below(400_000)
                    };
                    a.record(base * nsid as u64 + tail);
                }
                let label = format!("EMULATED (inline) NSID {nsid}, core {core}");
                series_v.push(series(&label, &a, hz).unwrap());
            }
        }
        let doc = svg("randread -q 128 -o 4096: latency by percentile", &series_v);
        let path =
            std::env::var("DIOXIDE_PLOT_SAMPLE").unwrap_or("/tmp/dioxide-sample-plot.svg".into());
        std::fs::write(path, doc).unwrap();
    }
}
