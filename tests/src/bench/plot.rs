//! SVG charts of the bench report, the bench history and the soak, drawn with `plotters` (its
//! SVG backend: text is SVG text, so no font or image library is needed). Each function takes
//! plain data and returns the SVG document; the callers write it next to their reports.

use anyhow::{Result, anyhow};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// Colours of the series, in turn (matplotlib's "tab10", readable on white).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// One line of a [`LinePanel`].
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a [`lines`] figure: its series share the x axis of the figure.
#[derive(Clone, Debug, Default)]
pub struct LinePanel {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    /// A dashed horizontal reference line (e.g. a target) and its legend label.
    pub reference: Option<(f64, String)>,
    /// The legend in the lower right corner instead of the upper left.
    pub legend_lower_right: bool,
}

/// `0.15000000000000002` → `0.15`: an axis label with at most 3 decimals, no trailing zeros.
fn short_number(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_owned() }
}

/// One bar of a [`BarPanel`]: its label under the axis, its value and a note drawn above it.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub note: String,
}

/// One chart of a [`bars`] figure.
#[derive(Clone, Debug, Default)]
pub struct BarPanel {
    pub title: String,
    pub y_desc: String,
    pub bars: Vec<Bar>,
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart failed: {e:?}")
}

/// The y range that shows every value of `values` (and `extra`) from zero, with headroom.
fn y_range(values: impl Iterator<Item = f64>, headroom: f64) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let span = hi - lo;
    (if lo < 0.0 { lo - span * 0.08 } else { lo })..hi + span * headroom
}

/// A figure of `panels` stacked vertically, sharing the x axis `x_desc`. With `x_labels`, x
/// values are indexes into it (e.g. runs labelled by date); otherwise plain numbers.
pub fn lines(
    title: &str,
    x_desc: &str,
    x_labels: Option<&[String]>,
    panels: &[LinePanel],
    width: u32,
    panel_height: u32,
) -> Result<String> {
    let mut svg = String::new();
    {
        let height = 40 + panel_height * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(title, ("sans-serif", 20).into_font())
            .map_err(err)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        let (mut x_lo, mut x_hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for p in panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
        {
            x_lo = x_lo.min(p.0);
            x_hi = x_hi.max(p.0);
        }
        if !x_lo.is_finite() {
            (x_lo, x_hi) = (0.0, 1.0);
        }
        if x_hi - x_lo < 1e-9 {
            x_hi = x_lo + 1.0;
        }
        if x_labels.is_some() {
            // Half a slot of room on each side of the first and last run.
            x_lo -= 0.5;
            x_hi += 0.5;
        }
        for (panel, area) in panels.iter().zip(&areas) {
            let ys = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .chain(panel.reference.as_ref().map(|r| r.0));
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 15).into_font())
                .margin(8)
                .x_label_area_size(36)
                .y_label_area_size(60)
                // Headroom above the lines for a legend in the upper left.
                .build_cartesian_2d(
                    x_lo..x_hi,
                    y_range(ys, if panel.legend_lower_right { 0.12 } else { 0.7 }),
                )
                .map_err(err)?;
            // With many runs, label every `step`-th one (labels are about 70 px wide).
            let step =
                x_labels.map_or(1, |l| l.len().div_ceil((width as usize / 80).max(1)).max(1));
            let label_of = |x: &f64| -> String {
                match x_labels {
                    Some(labels) if (x - x.round()).abs() < 1e-6 && *x >= 0.0 => {
                        let i = x.round() as usize;
                        if i.is_multiple_of(step) {
                            labels.get(i).cloned().unwrap_or_default()
                        } else {
                            String::new()
                        }
                    }
                    Some(_) => String::new(),
                    None => short_number(*x),
                }
            };
            let mut mesh = chart.configure_mesh();
            mesh.y_desc(panel.y_desc.as_str())
                .x_desc(x_desc)
                .x_label_formatter(&label_of)
                .y_label_formatter(&|y: &f64| short_number(*y))
                .light_line_style(WHITE.mix(0.0))
                .label_style(("sans-serif", 12).into_font());
            if let Some(labels) = x_labels {
                mesh.x_labels(labels.len() + 2);
            }
            mesh.draw().map_err(err)?;
            for (i, s) in panel.series.iter().enumerate() {
                let c = colour(i);
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
                if x_labels.is_some() || s.points.len() <= 40 {
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .map(|&(x, y)| Circle::new((x, y), 3, c.filled())),
                        )
                        .map_err(err)?;
                }
            }
            if let Some((y, label)) = &panel.reference {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(x_lo, *y), (x_hi, *y)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?
                    .label(label.as_str())
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
            }
            chart
                .configure_series_labels()
                .position(if panel.legend_lower_right {
                    SeriesLabelPosition::LowerRight
                } else {
                    SeriesLabelPosition::UpperLeft
                })
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font(("sans-serif", 12).into_font())
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A figure of bar charts, `cols` per row; each bar carries its note (e.g. the ratio to raw).
pub fn bars(
    title: &str,
    panels: &[BarPanel],
    cols: usize,
    width: u32,
    row_height: u32,
) -> Result<String> {
    let mut svg = String::new();
    {
        let cols = cols.max(1);
        let rows = panels.len().div_ceil(cols).max(1);
        let root = SVGBackend::with_string(&mut svg, (width, 40 + row_height * rows as u32))
            .into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(title, ("sans-serif", 20).into_font())
            .map_err(err)?;
        let areas = root.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(&areas) {
            let n = panel.bars.len().max(1);
            let labels: Vec<String> = panel.bars.iter().map(|b| b.label.clone()).collect();
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 15).into_font())
                .margin(10)
                .x_label_area_size(28)
                .y_label_area_size(56)
                .build_cartesian_2d(
                    // A segmented 0..k has k + 1 segments.
                    (0..n as i32 - 1).into_segmented(),
                    y_range(panel.bars.iter().map(|b| b.value), 0.18),
                )
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(WHITE.mix(0.0))
                .y_desc(panel.y_desc.as_str())
                .y_label_formatter(&|y: &f64| short_number(*y))
                .x_label_formatter(&|v: &SegmentValue<i32>| match v {
                    SegmentValue::CenterOf(i) => {
                        labels.get(*i as usize).cloned().unwrap_or_default()
                    }
                    _ => String::new(),
                })
                .label_style(("sans-serif", 12).into_font())
                .draw()
                .map_err(err)?;
            chart
                .draw_series(panel.bars.iter().enumerate().map(|(i, b)| {
                    let i = i as i32;
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), b.value),
                        ],
                        colour(i as usize).filled(),
                    );
                    r.set_margin(0, 0, 14, 14);
                    r
                }))
                .map_err(err)?;
            chart
                .draw_series(panel.bars.iter().enumerate().map(|(i, b)| {
                    Text::new(
                        b.note.clone(),
                        (SegmentValue::CenterOf(i as i32), b.value),
                        TextStyle::from(("sans-serif", 12).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Checks that `svg` is a whole SVG document with drawn content (for tests and callers that
/// read a chart back).
pub fn check_svg(svg: &str) -> Result<()> {
    let svg = svg.trim();
    anyhow::ensure!(
        svg.starts_with("<svg") && svg.ends_with("</svg>"),
        "not an SVG document"
    );
    anyhow::ensure!(
        ["<polyline", "<rect", "<path", "<circle"]
            .iter()
            .any(|e| svg.contains(e)),
        "an SVG document with nothing drawn"
    );
    let opened = svg.matches("<svg").count();
    let closed = svg.matches("</svg>").count();
    anyhow::ensure!(opened == closed, "unbalanced <svg> elements");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_figure_has_every_panel_series_and_label() {
        let panels = vec![
            LinePanel {
                title: "RSS".into(),
                y_desc: "MiB".into(),
                series: vec![
                    Series {
                        label: "node-a".into(),
                        points: vec![(0.0, 10.0), (1.0, 12.0), (2.0, 12.5)],
                    },
                    Series {
                        label: "node-b".into(),
                        points: vec![(0.0, 9.0), (1.0, 11.0), (2.0, 11.0)],
                    },
                ],
                reference: Some((13.0, "limit".into())),
                legend_lower_right: false,
            },
            LinePanel {
                title: "fds".into(),
                y_desc: "open fds".into(),
                series: vec![Series {
                    label: "node-a".into(),
                    points: vec![(0.0, 30.0), (2.0, 31.0)],
                }],
                reference: None,
                legend_lower_right: true,
            },
        ];
        let labels = vec![
            "11-26 03:07".to_owned(),
            "11-26 03:47".into(),
            "12-07".into(),
        ];
        let svg = lines("soak", "minutes", Some(&labels), &panels, 800, 260).expect("chart");
        check_svg(&svg).expect("valid");
        for text in [
            "soak",
            "RSS",
            "fds",
            "node-a",
            "node-b",
            "limit",
            "11-26 03:47",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(
            svg.matches("<polyline").count() >= 3,
            "three lines at least"
        );
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(short_number(0.150_000_000_000_000_02), "0.15");
        assert_eq!(short_number(2.0), "2");
        assert_eq!(short_number(-0.0001), "0");
        assert_eq!(short_number(12.5), "12.5");
    }

    #[test]
    fn bar_figure_draws_one_bar_per_value_with_its_note() {
        let panels = vec![BarPanel {
            title: "throughput 1 flow".into(),
            y_desc: "Gbit/s".into(),
            bars: vec![
                Bar {
                    label: "raw".into(),
                    value: 20.0,
                    note: "20.0".into(),
                },
                Bar {
                    label: "cross node".into(),
                    value: 5.0,
                    note: "0.25×".into(),
                },
            ],
        }];
        let svg = bars("bench", &panels, 2, 800, 300).expect("chart");
        check_svg(&svg).expect("valid");
        for text in ["throughput 1 flow", "raw", "cross node", "0.25×"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(check_svg("<svg></svg>").is_err(), "nothing drawn");
        assert!(check_svg("plain text").is_err());
    }
}
