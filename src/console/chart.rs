//! Charts drawn on the server as inline SVG from the numbers (no script, no library, works offline): a
//! stacked bar per day with one colour per series, and budget bars that turn amber and red.

use maud::{Markup, html};

/// Colours of the series, in order (readable on white and told apart in greyscale by lightness).
const PALETTE: [&str; 8] = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9", "#84cc16", "#64748b"];

/// The colour of series `i`.
pub fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// A stacked bar chart: `labels` along the x axis, `series` (name, one value per label) stacked.
pub fn stacked_bars(title: &str, labels: &[String], series: &[(String, Vec<f64>)], money: bool) -> Markup {
    const W: f64 = 1000.0;
    const H: f64 = 220.0;
    const LEFT: f64 = 56.0;
    const BOTTOM: f64 = 22.0;
    const TOP: f64 = 8.0;
    let totals: Vec<f64> =
        (0..labels.len()).map(|i| series.iter().map(|(_, v)| v.get(i).copied().unwrap_or(0.0)).sum()).collect();
    let step = nice_step(totals.iter().copied().fold(0.0, f64::max) / 4.0, money);
    let max = step * 4.0;
    let plot_h = H - BOTTOM - TOP;
    let slot = (W - LEFT) / labels.len().max(1) as f64;
    let bar = (slot * 0.8).max(1.0);
    let y = |v: f64| TOP + plot_h - v / max * plot_h;
    let fmt = |v: f64| {
        if money {
            format!("${v:.2}")
        } else if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let label_every = (labels.len() / 8).max(1);
    // (x, y, height, colour, tooltip) of every segment, stacked bottom-up.
    let mut rects = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let mut base = 0.0;
        for (s, (name, values)) in series.iter().enumerate() {
            let v = values.get(i).copied().unwrap_or(0.0);
            if v > 0.0 {
                let tip = format!("{label} · {name}: {}", fmt(v));
                rects.push((x, y(base + v), (v / max * plot_h).max(0.5), colour(s), tip));
            }
            base += v;
        }
    }
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) xmlns="http://www.w3.org/2000/svg" {
                @for step in 0..=4 {
                    @let v = max * f64::from(step) / 4.0;
                    line x1=(LEFT) x2=(W) y1=(y(v)) y2=(y(v)) stroke="#e5e7eb" {}
                    text x=(LEFT - 4.0) y=(y(v) + 4.0) text-anchor="end" font-size="10" fill="#6b7280" { (fmt(v)) }
                }
                @for (x, top, height, fill, tip) in &rects {
                    rect x=(format!("{x:.1}")) y=(format!("{top:.1}")) width=(format!("{bar:.1}")) height=(format!("{height:.1}")) fill=(fill) {
                        title { (tip) }
                    }
                }
                @for (i, label) in labels.iter().enumerate() {
                    @if i % label_every == 0 {
                        text x=(format!("{:.1}", LEFT + slot * i as f64 + slot / 2.0)) y=(H - 6.0) text-anchor="middle" font-size="10" fill="#6b7280" { (label.get(5..).unwrap_or(label)) }
                    }
                }
            }
            @if !series.is_empty() {
                ul.legend {
                    @for (s, (name, _)) in series.iter().enumerate() {
                        li { span class=(format!("swatch s{}", s % PALETTE.len())) {} (name) }
                    }
                }
            }
        }
    }
}

/// A round step between the axis's five lines (1, 2 or 5 times a power of ten) of at least `v`: counts step by
/// whole numbers, money by at least a cent.
fn nice_step(v: f64, money: bool) -> f64 {
    let floor = if money { 0.01 } else { 1.0 };
    if !v.is_finite() || v <= floor {
        return floor;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|m| *m >= v).unwrap_or(10.0 * magnitude)
}

/// How full a budget is: green below 80 %, amber from 80 %, red at 100 %.
pub fn level(used: f64, limit: f64) -> &'static str {
    if limit <= 0.0 || used >= limit {
        "red"
    } else if used >= 0.8 * limit {
        "amber"
    } else {
        "green"
    }
}

/// A horizontal bar of `used` against `limit`.
pub fn budget_bar(label: &str, used: f64, limit: f64, money: bool) -> Markup {
    let pct = if limit > 0.0 { (used / limit * 100.0).clamp(0.0, 100.0) } else { 100.0 };
    let text = if money { format!("${used:.2} of ${limit:.2}") } else { format!("{used:.0} of {limit:.0}") };
    html! {
        div.budget data-level=(level(used, limit)) {
            span.budget-label { (label) }
            svg.budget-bar viewBox="0 0 100 8" preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg" {
                rect x="0" y="0" width="100" height="8" fill="#e5e7eb" {}
                rect x="0" y="0" width=(format!("{pct:.1}")) height="8" class=(level(used, limit)) {}
            }
            span.budget-text { (text) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_round_and_counts_step_by_whole_numbers() {
        assert_eq!(nice_step(0.0, false), 1.0);
        assert_eq!(nice_step(0.3, false), 1.0);
        assert_eq!(nice_step(1.75, false), 2.0);
        assert_eq!(nice_step(12.0, false), 20.0);
        assert_eq!(nice_step(500.0, false), 500.0);
        assert_eq!(nice_step(0.0, true), 0.01);
        assert_eq!(nice_step(0.03, true), 0.05);
    }

    #[test]
    fn budgets_turn_amber_then_red() {
        assert_eq!(level(10.0, 100.0), "green");
        assert_eq!(level(80.0, 100.0), "amber");
        assert_eq!(level(100.0, 100.0), "red");
        assert_eq!(level(0.0, 0.0), "red", "a zero budget is spent");
    }

    #[test]
    fn series_names_are_escaped_in_the_svg() {
        let svg = stacked_bars("t", &["2026-12-01".into()], &[("<script>".into(), vec![1.0])], false).into_string();
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"));
    }
}
