//! Charts as server-rendered SVG: readable without JavaScript, no library.

use maud::{html, Markup};

/// A bar chart of `values` (oldest first), with an optional limit drawn as a dashed line.
/// `first` and `last` label the ends of the time axis.
pub fn bars(title: &str, values: &[f64], limit: Option<f64>, first: &str, last: &str, unit: &str) -> Markup {
    const W: f64 = 600.0;
    const H: f64 = 140.0;
    const PAD_L: f64 = 48.0;
    const PAD_B: f64 = 18.0;
    const PAD_T: f64 = 16.0;
    let max = values.iter().copied().chain(limit).fold(0.0_f64, f64::max).max(1.0);
    let plot_w = W - PAD_L - 4.0;
    let plot_h = H - PAD_B - PAD_T;
    let n = values.len().max(1) as f64;
    let bw = plot_w / n;
    let y = |v: f64| PAD_T + plot_h - v / max * plot_h;
    html! {
        svg class="chart" viewBox=(format!("0 0 {W} {H}")) width=(W) height=(H) role="img" aria-label=(title) xmlns="http://www.w3.org/2000/svg" {
            title { (title) }
            text x="4" y="11" class="axis" { (title) }
            line x1=(PAD_L) y1=(PAD_T + plot_h) x2=(W - 4.0) y2=(PAD_T + plot_h) class="axisline" {}
            text x=(PAD_L - 4.0) y=(PAD_T + 8.0) text-anchor="end" class="axis" { (fmt(max)) }
            text x=(PAD_L - 4.0) y=(PAD_T + plot_h) text-anchor="end" class="axis" { "0" }
            @for (i, v) in values.iter().enumerate() {
                @if *v > 0.0 {
                    rect x=(format!("{:.1}", PAD_L + i as f64 * bw + 0.5)) y=(format!("{:.1}", y(*v)))
                         width=(format!("{:.1}", (bw - 1.0).max(0.5))) height=(format!("{:.1}", PAD_T + plot_h - y(*v)))
                         class="bar" {
                        title { (fmt(*v)) " " (unit) }
                    }
                }
            }
            @if let Some(l) = limit {
                line x1=(PAD_L) x2=(W - 4.0) y1=(format!("{:.1}", y(l))) y2=(format!("{:.1}", y(l))) class="limit" {}
                text x=(W - 6.0) y=(format!("{:.1}", y(l) - 3.0)) text-anchor="end" class="axis" { "limit " (fmt(l)) }
            }
            text x=(PAD_L) y=(H - 4.0) class="axis" { (first) }
            text x=(W - 4.0) y=(H - 4.0) text-anchor="end" class="axis" { (last) }
        }
    }
}

/// A number short enough for an axis.
pub fn fmt(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
