//! `agora soak-plot`: draws a soak run's per-interval rows (JSON lines, as
//! `scripts/bench-soak` writes them) as one SVG of stacked panels — throughput, p99,
//! leader RSS, bytes per order — over the run's time. Hand-written SVG: no plotting
//! dependency, renders in any browser.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// JSON lines, one object per interval, with `t_s` and the panels' fields.
    #[arg(long)]
    pub input: PathBuf,
    /// Where the SVG goes.
    #[arg(long)]
    pub output: PathBuf,
    /// Title above the panels.
    #[arg(long, default_value = "Agora soak")]
    pub title: String,
}

/// The panels: field of a row, and its label.
const PANELS: [(&str, &str); 4] = [
    ("throughput_per_s", "orders/s"),
    ("p99_ms", "p99 latency (ms)"),
    ("leader_rss_mb", "leader RSS (MB)"),
    ("bytes_per_order", "leader data dir bytes per acknowledged order"),
];

const WIDTH: f64 = 760.0;
const PANEL_H: f64 = 150.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 56.0;
const GAP: f64 = 40.0;

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("read {}", args.input.display()))?;
    let rows: Vec<Value> = text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>().context("parse rows")?;
    std::fs::write(&args.output, svg(&args.title, &rows)).with_context(|| format!("write {}", args.output.display()))?;
    Ok(())
}

/// A round step for about four grid lines up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG of `rows` (each with `t_s` and the panels' fields; a missing field skips the point).
pub fn svg(title: &str, rows: &[Value]) -> String {
    let height = TOP + PANELS.len() as f64 * (PANEL_H + GAP) + 10.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let t_max = rows.iter().filter_map(|r| r["t_s"].as_f64()).fold(0.0, f64::max).max(1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    for (i, (field, label)) in PANELS.iter().enumerate() {
        let y0 = TOP + i as f64 * (PANEL_H + GAP);
        let points: Vec<(f64, f64)> = rows.iter().filter_map(|r| Some((r["t_s"].as_f64()?, r[*field].as_f64()?))).collect();
        let v_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let step = nice_step(v_max);
        let top = (v_max / step).ceil().max(1.0) * step;
        let x = |t: f64| LEFT + t / t_max * plot_w;
        let y = |v: f64| y0 + PANEL_H - v / top * PANEL_H;
        let _ = writeln!(out, r#"<text x="{LEFT}" y="{:.1}" font-weight="bold">{}</text>"#, y0 - 6.0, escape(label));
        let mut g = 0.0;
        while g <= top + step / 2.0 {
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y(g) + 4.0,
                fmt_value(g),
                yy = y(g)
            );
            g += step;
        }
        let t_step = nice_step(t_max / 60.0) * 60.0;
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let _ = writeln!(
                out,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{y0:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{} min</text>"##,
                y0 + PANEL_H,
                y0 + PANEL_H + 14.0,
                fmt_value(t / 60.0),
                xx = x(t)
            );
            t += t_step;
        }
        let _ = writeln!(out, r##"<rect x="{LEFT}" y="{y0:.1}" width="{plot_w:.1}" height="{PANEL_H}" fill="none" stroke="#888"/>"##);
        if !points.is_empty() {
            let path: Vec<String> = points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
            let _ = writeln!(out, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##, path.join(" "));
            for (t, v) in &points {
                let _ = writeln!(out, r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f77b4"/>"##, x(*t), y(*v));
            }
        }
    }
    out.push_str("</svg>\n");
    out
}

fn fmt_value(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(6330.0), 2000.0);
        assert_eq!(nice_step(10.0), 2.5);
        assert_eq!(nice_step(0.0), 1.0);
    }

    #[test]
    fn every_panel_has_a_line_through_its_points() {
        let rows = vec![
            json!({"t_s": 60, "throughput_per_s": 6000, "p99_ms": 30.5, "leader_rss_mb": 180, "bytes_per_order": 900}),
            json!({"t_s": 120, "throughput_per_s": 5000, "p99_ms": 40.0, "leader_rss_mb": 300, "bytes_per_order": 1000}),
        ];
        let s = svg("a <b>", &rows);
        assert_eq!(s.matches("<polyline").count(), 4);
        assert_eq!(s.matches("<circle").count(), 8);
        assert!(s.contains("a &lt;b&gt;") && s.ends_with("</svg>\n"));
        // No rows: axes only, still a valid document.
        assert_eq!(svg("x", &[]).matches("<polyline").count(), 0);
    }
}
