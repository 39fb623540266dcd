//! Charts as SVG strings, drawn with plotters' SVG backend. Text is SVG `<text>` in the browser's
//! sans-serif, so the report needs no font file and no script.

use anyhow::Result;
use plotters::coord::ranged1d::SegmentValue;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 320;
/// Most points a series draws: a long run's per-step file would otherwise make the page heavy.
const MAX_POINTS: usize = 2000;

/// Distinguishable on white (Tableau 10).
pub const PALETTE: [RGBColor; 10] = [
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

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series of the finite values of `points`.
    pub fn new(
        name: impl Into<String>,
        points: impl IntoIterator<Item = (f64, Option<f64>)>,
    ) -> Self {
        Series {
            name: name.into(),
            points: points
                .into_iter()
                .filter_map(|(x, y)| Some((x, y?)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
        }
    }
}

/// A vertical line across a chart at `x`: something that happened to the job (a regroup, a round).
pub struct Mark {
    pub x: f64,
    /// Short, drawn at the top of the line (the event's number in the report's table).
    pub label: String,
    /// The legend entry; marks of one kind share it and their colour.
    pub kind: String,
    pub color: RGBColor,
}

pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub series: Vec<Series>,
    pub marks: &'a [Mark],
}

impl LineChart<'_> {
    /// The chart as an `<svg>` element, or `None` when no series has a point.
    pub fn to_svg(&self) -> Result<Option<String>> {
        let series: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            return Ok(None);
        }
        let all = series.iter().flat_map(|s| s.points.iter());
        let (x_range, y_range) = ranges(all.clone().map(|p| p.0), all.map(|p| p.1));
        // Marks outside the curves' span are still drawn (a regroup before the first evaluation).
        let x_range = widen(
            x_range,
            self.marks.iter().map(|m| m.x).filter(|x| x.is_finite()),
        );
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(self.title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(x_range.clone(), y_range.clone())?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc)
                .y_desc(self.y_desc)
                .light_line_style(WHITE.mix(0.0))
                .bold_line_style(BLACK.mix(0.08))
                .label_style(("sans-serif", 12))
                .y_label_formatter(&|v| short_number(*v))
                .x_label_formatter(&|v| short_number(*v))
                .draw()?;
            let mut kinds_seen: Vec<&str> = Vec::new();
            for m in self.marks.iter().filter(|m| m.x.is_finite()) {
                let color = m.color;
                let line = DashedPathElement::new(
                    vec![(m.x, y_range.start), (m.x, y_range.end)],
                    4,
                    3,
                    color.stroke_width(1),
                );
                let anno = chart.draw_series(std::iter::once(line))?;
                if !kinds_seen.contains(&m.kind.as_str()) {
                    kinds_seen.push(&m.kind);
                    anno.label(m.kind.clone()).legend(move |(x, y)| {
                        DashedPathElement::new(
                            vec![(x, y), (x + 16, y)],
                            4,
                            3,
                            color.stroke_width(1),
                        )
                    });
                }
                chart.draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (m.x, y_range.end),
                    ("sans-serif", 11).into_font().color(&color),
                )))?;
            }
            for (i, s) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let points = thin(&s.points);
                // Sparse series (evaluations every few epochs) show their points.
                let dots = if points.len() <= 60 { 3 } else { 0 };
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(dots))?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(legend_position(&series, &y_range))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw()?;
            root.present()?;
        }
        Ok(Some(svg))
    }
}

/// The legend goes in the right-hand corner the curves' ends leave free: bottom right for rising
/// curves (accuracy), top right for falling ones (loss).
fn legend_position(series: &[&Series], y: &Span) -> SeriesLabelPosition {
    let height = y.end - y.start;
    let ends: Vec<f64> = series
        .iter()
        .flat_map(|s| {
            let tail = (s.points.len() / 10).max(1);
            s.points[s.points.len() - tail..]
                .iter()
                .map(|p| (p.1 - y.start) / height)
        })
        .collect();
    let mean = ends.iter().sum::<f64>() / ends.len().max(1) as f64;
    if mean > 0.5 {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// Horizontal stacked bars, one per category (a rank): e.g. the mean step time split into its phases.
pub struct StackedBars<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub categories: Vec<String>,
    /// (part name, one value per category).
    pub parts: Vec<(String, Vec<f64>)>,
}

impl StackedBars<'_> {
    pub fn to_svg(&self) -> Result<Option<String>> {
        let n = self.categories.len();
        if n == 0 || self.parts.is_empty() {
            return Ok(None);
        }
        let total = |c: usize| -> f64 {
            self.parts
                .iter()
                .map(|(_, v)| {
                    v.get(c)
                        .copied()
                        .filter(|x| x.is_finite())
                        .unwrap_or(0.0)
                        .max(0.0)
                })
                .sum()
        };
        let max = (0..n).map(total).fold(0.0f64, f64::max);
        let max = if max > 0.0 { max * 1.25 } else { 1.0 };
        let height = (80 + 34 * n as u32).clamp(180, 900);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
            root.fill(&WHITE)?;
            let categories = self.categories.clone();
            let mut chart = ChartBuilder::on(&root)
                .caption(self.title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(0.0..max, (0..n).into_segmented())?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc)
                .light_line_style(WHITE.mix(0.0))
                .bold_line_style(BLACK.mix(0.08))
                .label_style(("sans-serif", 12))
                .x_label_formatter(&|v| short_number(*v))
                .y_labels(n)
                .y_label_formatter(&move |v| match v {
                    SegmentValue::CenterOf(i) => categories.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .draw()?;
            let mut start = vec![0.0f64; n];
            for (p, (name, values)) in self.parts.iter().enumerate() {
                let color = PALETTE[p % PALETTE.len()];
                let bars: Vec<Rectangle<(f64, SegmentValue<usize>)>> = (0..n)
                    .map(|c| {
                        let v = values
                            .get(c)
                            .copied()
                            .filter(|x| x.is_finite())
                            .unwrap_or(0.0)
                            .max(0.0);
                        let x0 = start[c];
                        start[c] += v;
                        let mut r = Rectangle::new(
                            [
                                (x0, SegmentValue::Exact(c)),
                                (x0 + v, SegmentValue::Exact(c + 1)),
                            ],
                            color.filled(),
                        );
                        r.set_margin(5, 5, 0, 0);
                        r
                    })
                    .collect();
                chart
                    .draw_series(bars)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw()?;
            root.present()?;
        }
        Ok(Some(svg))
    }
}

/// At most [`MAX_POINTS`] evenly spaced points, always keeping the last.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let stride = points.len().div_ceil(MAX_POINTS);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(stride).copied().collect();
    if let Some(&last) = points.last() {
        if out.last() != Some(&last) {
            out.push(last);
        }
    }
    out
}

type Span = std::ops::Range<f64>;

/// The axes' spans: the data's, padded a little so curves do not touch the frame, and never empty.
fn ranges(xs: impl Iterator<Item = f64>, ys: impl Iterator<Item = f64>) -> (Span, Span) {
    let span = |it: &mut dyn Iterator<Item = f64>| {
        it.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        })
    };
    let (x0, x1) = span(&mut { xs });
    let (y0, y1) = span(&mut { ys });
    let x = if x1 > x0 { x0..x1 } else { x0 - 1.0..x0 + 1.0 };
    let pad = if y1 > y0 {
        (y1 - y0) * 0.06
    } else {
        y0.abs().max(1.0) * 0.1
    };
    (x, y0 - pad..y1 + pad)
}

fn widen(r: Span, xs: impl Iterator<Item = f64>) -> Span {
    xs.fold(r, |r, x| r.start.min(x)..r.end.max(x))
}

/// Axis labels: few digits, scientific for very small or large magnitudes (learning rates).
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// plotters writes a `<text>` element's content on a line of its own.
    fn has_text(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{text}\n</text>"))
    }

    #[test]
    fn a_chart_has_its_title_labels_legend_and_marks() {
        let marks = [Mark {
            x: 2.0,
            label: "1".into(),
            kind: "regroup".into(),
            color: PALETTE[3],
        }];
        let svg = LineChart {
            title: "Loss & <friends>",
            x_desc: "epoch",
            y_desc: "loss",
            series: vec![Series::new(
                "train",
                [
                    (0.0, Some(1.0)),
                    (1.0, Some(0.5)),
                    (2.0, None),
                    (3.0, Some(f64::NAN)),
                    (4.0, Some(0.2)),
                ],
            )],
            marks: &marks,
        }
        .to_svg()
        .unwrap()
        .expect("a series with points gives a chart");
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(
            svg.contains("Loss &amp; &lt;friends&gt;"),
            "the title is escaped"
        );
        for text in ["epoch", "loss", "train", "regroup", "1"] {
            assert!(has_text(&svg, text), "missing {text}");
        }
        assert!(svg.contains("stroke-dasharray") || svg.matches("<line").count() > 0);
    }

    #[test]
    fn no_points_no_chart() {
        let chart = LineChart {
            title: "t",
            x_desc: "x",
            y_desc: "y",
            series: vec![Series::new("a", [(0.0, None)])],
            marks: &[],
        };
        assert!(chart.to_svg().unwrap().is_none());
    }

    #[test]
    fn stacked_bars_name_each_category() {
        let svg = StackedBars {
            title: "split",
            x_desc: "seconds",
            categories: vec!["rank 0".into(), "rank 1".into()],
            parts: vec![
                ("data".into(), vec![0.001, 0.002]),
                ("compute".into(), vec![0.01, 0.02]),
            ],
        }
        .to_svg()
        .unwrap()
        .unwrap();
        assert!(has_text(&svg, "rank 0") && has_text(&svg, "rank 1"));
        assert!(has_text(&svg, "compute"));
    }

    #[test]
    fn ranges_are_never_empty() {
        let (x, y) = ranges([3.0].into_iter(), [0.5].into_iter());
        assert!(x.end > x.start && y.end > y.start);
        assert!(y.contains(&0.5));
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let pts: Vec<(f64, f64)> = (0..10_001).map(|i| (i as f64, 0.0)).collect();
        let t = thin(&pts);
        assert!(t.len() <= MAX_POINTS + 1);
        assert_eq!(t.first(), pts.first());
        assert_eq!(t.last(), pts.last());
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(0.0001), "1.0e-4");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(12.0), "12");
        assert_eq!(short_number(5400.3), "5400");
    }
}
