//! The report's HTML: one page, inline CSS, charts as inline SVG, no script (nothing to load or fail
//! at view time).

use super::chart::{LineChart, Mark, Series, StackedBars, PALETTE};
use super::data::{EventRow, RunData, StepRow, CONFIG, EVENTS, METRICS, STEPS, SUMMARY};
use anyhow::Result;
use plotters::style::RGBColor;
use std::collections::BTreeMap;
use std::fmt::Write as _;

const CSS: &str = "
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #222; margin: 0;
       background: #f6f7f9; }
main { max-width: 1360px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #dde; padding-bottom: 4px; }
.sub { color: #667; margin: 0 0 12px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure.chart { margin: 0; background: #fff; border: 1px solid #e2e4e8; border-radius: 6px; padding: 4px; }
figure.chart svg { display: block; max-width: 100%; height: auto; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid #e2e4e8; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #eef0f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #fff; border: 1px solid #e2e4e8; border-radius: 6px; padding: 10px 14px;
      overflow-x: auto; font-size: 12.5px; }
.note { background: #fff8e1; border: 1px solid #f0d98c; border-radius: 6px; padding: 6px 12px;
        margin: 6px 0; }
.muted { color: #778; }
";

/// Event kinds drawn on the curves; the others (e.g. `late_rank`, which may come every few steps) are
/// listed in the events table only.
const MARKED_KINDS: [(&str, RGBColor); 8] = [
    ("regroup", RGBColor(214, 39, 40)),
    ("join", RGBColor(44, 160, 44)),
    ("restart", RGBColor(255, 127, 14)),
    ("resume", RGBColor(140, 86, 75)),
    ("round", RGBColor(148, 103, 189)),
    ("stage", RGBColor(23, 190, 207)),
    ("stall", RGBColor(0, 0, 0)),
    ("generation", RGBColor(214, 39, 40)),
];

fn mark_color(kind: &str) -> Option<RGBColor> {
    MARKED_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, c)| *c)
}

/// What is marked on the curves: where it is on each x axis.
struct Happening {
    label: String,
    kind: String,
    epoch: Option<f64>,
    step: Option<f64>,
}

pub fn render(run: &RunData) -> Result<String> {
    let mut page = Page::default();
    let happenings = happenings(run, &mut page.notes);
    page.notes.extend(run.notes.iter().cloned());
    let epoch_marks = marks(&happenings, |h| h.epoch);
    let step_marks = marks(&happenings, |h| h.step);

    page.final_table(run);
    page.events(run, &happenings);
    page.epoch_curves(run, &epoch_marks)?;
    page.step_curves(run, &step_marks)?;
    page.ranks(run, &step_marks)?;
    page.rounds(run)?;
    page.stages(run)?;
    page.config(run);
    Ok(page.finish(run))
}

#[derive(Default)]
struct Page {
    body: String,
    notes: Vec<String>,
}

impl Page {
    fn h2(&mut self, title: &str, id: &str) {
        let _ = writeln!(self.body, "<h2 id=\"{id}\">{}</h2>", esc(title));
    }

    fn para(&mut self, class: &str, text: &str) {
        let _ = writeln!(self.body, "<p class=\"{class}\">{}</p>", esc(text));
    }

    /// Charts side by side; a chart without data is left out.
    fn charts(&mut self, charts: Vec<(Option<String>, usize)>) {
        let drawn: Vec<_> = charts
            .into_iter()
            .filter_map(|(svg, marks)| svg.map(|s| (s, marks)))
            .collect();
        if drawn.is_empty() {
            return;
        }
        self.body.push_str("<div class=\"grid\">\n");
        for (svg, marks) in drawn {
            let _ = writeln!(
                self.body,
                "<figure class=\"chart\" data-marks=\"{marks}\">{svg}</figure>"
            );
        }
        self.body.push_str("</div>\n");
    }

    fn final_table(&mut self, run: &RunData) {
        self.h2("Final metrics", "final");
        let Some(summary) = &run.summary else {
            self.para("muted", &format!("No {SUMMARY}: the job has not finished."));
            return;
        };
        // The fields a reader looks for first, then the rest as the file has them.
        const FIRST: [&str; 10] = [
            "job",
            "test_accuracy",
            "val_accuracy",
            "test_loss",
            "world_size",
            "generation",
            "epochs",
            "samples_per_second",
            "wall_seconds",
            "checkpoint",
        ];
        // Drawn in their own sections.
        const ELSEWHERE: [&str; 3] = ["history", "rounds", "stages"];
        let mut keys: Vec<&str> = FIRST
            .iter()
            .copied()
            .filter(|k| summary.raw.contains_key(*k))
            .collect();
        keys.extend(
            summary
                .raw
                .keys()
                .map(String::as_str)
                .filter(|k| !FIRST.contains(k) && !ELSEWHERE.contains(k)),
        );
        self.body.push_str("<table class=\"final\">\n");
        for k in keys {
            let (text, num) = cell(&summary.raw[k]);
            let class = if num { " class=\"num\"" } else { "" };
            let _ = writeln!(
                self.body,
                "<tr><th>{}</th><td{class}>{}</td></tr>",
                esc(k),
                esc(&text)
            );
        }
        self.body.push_str("</table>\n");
    }

    fn events(&mut self, run: &RunData, happenings: &[Happening]) {
        if run.events.is_empty() && happenings.is_empty() {
            return;
        }
        self.h2("Events", "events");
        if !run.events.is_empty() {
            self.body.push_str(
                "<table class=\"events\">\n<tr><th>#</th><th>kind</th><th>wall s</th><th>epoch</th>\
                 <th>step</th><th>generation</th><th>detail</th></tr>\n",
            );
            for (i, e) in run.events.iter().enumerate() {
                let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
                let _ = writeln!(
                    self.body,
                    "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                     <td>{}</td></tr>",
                    i + 1,
                    esc(&e.kind),
                    e.wall_seconds
                        .map(|w| format!("{w:.1}"))
                        .unwrap_or_default(),
                    opt(e.epoch),
                    opt(e.step),
                    opt(e.generation),
                    esc(&e.detail)
                );
            }
            self.body.push_str("</table>\n");
        }
        let kinds: Vec<&str> = MARKED_KINDS.iter().map(|(k, _)| *k).collect();
        self.para(
            "muted",
            &format!(
                "Dashed lines on the curves mark {} (labelled with the event's number; r = a \
                 pseudo-label round's start, g = a new generation seen in {STEPS}).",
                kinds.join(", ")
            ),
        );
    }

    fn epoch_curves(&mut self, run: &RunData, marks: &[Mark]) -> Result<()> {
        let e = &run.epochs;
        if e.is_empty() {
            return Ok(());
        }
        let staged = run
            .summary
            .as_ref()
            .is_some_and(|s| !s.view.stages.is_empty());
        self.h2(
            if staged {
                "Per epoch (fine-tuning stage)"
            } else {
                "Per epoch"
            },
            "epochs",
        );
        let x = |r: &super::data::EpochRow| r.epoch as f64;
        let loss = LineChart {
            title: "Loss",
            x_desc: "epoch",
            y_desc: "loss",
            series: vec![
                Series::new("train", e.iter().map(|r| (x(r), r.train_loss))),
                Series::new("validation", e.iter().map(|r| (x(r), r.val_loss))),
                Series::new("test", e.iter().map(|r| (x(r), r.test_loss))),
            ],
            marks,
        };
        let acc = LineChart {
            title: "Accuracy",
            x_desc: "epoch",
            y_desc: "accuracy",
            series: vec![
                Series::new("validation", e.iter().map(|r| (x(r), r.val_accuracy))),
                Series::new("test", e.iter().map(|r| (x(r), r.test_accuracy))),
            ],
            marks,
        };
        let lr = LineChart {
            title: "Learning rate (end of epoch)",
            x_desc: "epoch",
            y_desc: "learning rate",
            series: vec![Series::new("lr", e.iter().map(|r| (x(r), r.learning_rate)))],
            marks,
        };
        let tput = LineChart {
            title: "Throughput, whole world",
            x_desc: "epoch",
            y_desc: "samples / s",
            series: vec![Series::new(
                "samples/s",
                e.iter().map(|r| (x(r), r.samples_per_second())),
            )],
            marks,
        };
        let n = marks.len();
        self.charts(vec![
            (loss.to_svg()?, n),
            (acc.to_svg()?, n),
            (lr.to_svg()?, n),
            (tput.to_svg()?, n),
        ]);
        Ok(())
    }

    fn step_curves(&mut self, run: &RunData, marks: &[Mark]) -> Result<()> {
        if run.steps.is_empty() {
            return Ok(());
        }
        self.h2("Per step", "steps");
        let tags: std::collections::BTreeSet<&str> = run
            .steps
            .iter()
            .flat_map(|s| s.scalars.keys().map(String::as_str))
            .collect();
        let series = |tag: &str| {
            Series::new(
                tag.strip_prefix("train/").unwrap_or(tag),
                run.steps.iter().map(|s| (s.step as f64, s.scalar(tag))),
            )
        };
        let n = marks.len();
        let mut charts = Vec::new();
        let losses: Vec<&str> = tags.iter().copied().filter(|t| is_loss(t)).collect();
        charts.push((
            LineChart {
                title: "Loss per step",
                x_desc: "step",
                y_desc: "loss",
                series: losses.iter().map(|t| series(t)).collect(),
                marks,
            }
            .to_svg()?,
            n,
        ));
        charts.push((
            LineChart {
                title: "Learning rate",
                x_desc: "step",
                y_desc: "learning rate",
                series: vec![series("train/lr")],
                marks,
            }
            .to_svg()?,
            n,
        ));
        let shown = ["train/lr", "train/samples_per_second"];
        for tag in tags
            .iter()
            .copied()
            .filter(|t| !is_loss(t) && !shown.contains(t))
        {
            charts.push((
                LineChart {
                    title: tag,
                    x_desc: "step",
                    y_desc: tag.rsplit('/').next().unwrap_or(tag),
                    series: vec![series(tag)],
                    marks,
                }
                .to_svg()?,
                n,
            ));
        }
        self.charts(charts);
        Ok(())
    }

    fn ranks(&mut self, run: &RunData, marks: &[Mark]) -> Result<()> {
        self.h2("Throughput and ranks", "ranks");
        if run.steps.is_empty() {
            self.para(
                "muted",
                &format!(
                    "Per-rank throughput and step times come from {STEPS}, which this run \
                     directory does not have (the whole world's throughput per epoch is above)."
                ),
            );
            return Ok(());
        }
        let ranks = per_rank(&run.steps);
        let n = marks.len();
        let mut tput = vec![Series::new(
            "world",
            run.steps
                .iter()
                .map(|s| (s.step as f64, s.scalar("train/samples_per_second"))),
        )];
        for (rank, rows) in &ranks {
            tput.push(Series::new(
                format!("rank {rank}"),
                rows.iter().map(|(step, r)| (*step, r.samples_per_second)),
            ));
        }
        let late = ranks
            .values()
            .flatten()
            .any(|(_, r)| r.lateness_seconds.unwrap_or(0.0) > 0.0);
        let lateness = late.then(|| LineChart {
            title: "Lateness per rank",
            x_desc: "step",
            y_desc: "seconds late",
            series: ranks
                .iter()
                .map(|(rank, rows)| {
                    Series::new(
                        format!("rank {rank}"),
                        rows.iter().map(|(step, r)| (*step, r.lateness_seconds)),
                    )
                })
                .collect(),
            marks,
        });
        let means: Vec<(u32, RankMeans)> = ranks
            .iter()
            .map(|(rank, rows)| (*rank, RankMeans::of(rows.iter().map(|(_, r)| *r))))
            .collect();
        let ms = |f: fn(&RankMeans) -> Option<f64>| -> Vec<f64> {
            means
                .iter()
                .map(|(_, m)| f(m).unwrap_or(0.0) * 1e3)
                .collect()
        };
        let split = StackedBars {
            title: "Mean step time per rank",
            x_desc: "milliseconds per step",
            categories: means.iter().map(|(r, _)| format!("rank {r}")).collect(),
            parts: vec![
                ("data".into(), ms(|m| m.data)),
                ("compute".into(), ms(|m| m.compute)),
                ("comm".into(), ms(|m| m.comm)),
                ("optimizer".into(), ms(|m| m.optim)),
            ],
        };
        self.charts(vec![
            (
                LineChart {
                    title: "Throughput",
                    x_desc: "step",
                    y_desc: "samples / s",
                    series: tput,
                    marks,
                }
                .to_svg()?,
                n,
            ),
            (split.to_svg()?, 0),
            (
                match lateness {
                    Some(c) => c.to_svg()?,
                    None => None,
                },
                n,
            ),
        ]);
        self.body.push_str(
            "<table class=\"ranks\">\n<tr><th>rank</th><th>samples/s</th><th>data ms</th>\
             <th>compute ms</th><th>comm ms</th><th>optimizer ms</th><th>late ms</th></tr>\n",
        );
        let f = |v: Option<f64>, scale: f64, digits: usize| {
            v.map(|v| format!("{:.*}", digits, v * scale))
                .unwrap_or_else(|| "—".into())
        };
        for (rank, m) in &means {
            let _ = writeln!(
                self.body,
                "<tr><td class=\"num\">{rank}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td></tr>",
                f(m.samples_per_second, 1.0, 0),
                f(m.data, 1e3, 2),
                f(m.compute, 1e3, 2),
                f(m.comm, 1e3, 2),
                f(m.optim, 1e3, 2),
                f(m.lateness, 1e3, 2),
            );
        }
        self.body.push_str("</table>\n");
        self.para(
            "muted",
            &format!("Means over the {} windows of {STEPS}.", run.steps.len()),
        );
        Ok(())
    }

    fn rounds(&mut self, run: &RunData) -> Result<()> {
        let Some(rounds) = run.summary.as_ref().and_then(|s| s.view.rounds.as_ref()) else {
            return Ok(());
        };
        if rounds.is_empty() {
            return Ok(());
        }
        self.h2("Pseudo-label rounds", "rounds");
        let classes = rounds
            .iter()
            .map(|r| r.pseudo_labels_per_class.len())
            .max()
            .unwrap_or(0);
        self.body
            .push_str("<table class=\"rounds\">\n<tr><th>round</th><th>test accuracy</th><th>pseudo-labels</th>");
        for c in 0..classes {
            let _ = write!(self.body, "<th>class {c}</th>");
        }
        self.body.push_str("</tr>\n");
        for r in rounds {
            let total: u64 = r.pseudo_labels_per_class.iter().sum();
            let _ = write!(
                self.body,
                "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{total}</td>",
                r.round,
                r.test_accuracy
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "—".into())
            );
            for c in 0..classes {
                let v = r.pseudo_labels_per_class.get(c).copied().unwrap_or(0);
                let _ = write!(self.body, "<td class=\"num\">{v}</td>");
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
        let chart = LineChart {
            title: "Test accuracy after each round",
            x_desc: "round",
            y_desc: "accuracy",
            series: vec![Series::new(
                "test",
                rounds.iter().map(|r| (r.round as f64, r.test_accuracy)),
            )],
            marks: &[],
        };
        let labels = LineChart {
            title: "Pseudo-labels per round",
            x_desc: "round",
            y_desc: "samples",
            series: vec![Series::new(
                "pseudo-labeled samples",
                rounds.iter().map(|r| {
                    (
                        r.round as f64,
                        Some(r.pseudo_labels_per_class.iter().sum::<u64>() as f64),
                    )
                }),
            )],
            marks: &[],
        };
        self.charts(vec![(chart.to_svg()?, 0), (labels.to_svg()?, 0)]);
        Ok(())
    }

    fn stages(&mut self, run: &RunData) -> Result<()> {
        let Some(stages) = run
            .summary
            .as_ref()
            .map(|s| &s.view.stages)
            .filter(|s| !s.is_empty())
        else {
            return Ok(());
        };
        self.h2("Stages", "stages");
        self.body.push_str(
            "<table class=\"stages\">\n<tr><th>stage</th><th>final train loss</th><th>epochs</th>\
             <th>steps</th><th>samples</th><th>seconds</th><th>test accuracy</th><th>checkpoint</th></tr>\n",
        );
        let opt = |v: Option<String>| v.unwrap_or_else(|| "—".into());
        for s in stages {
            let _ = writeln!(
                self.body,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&s.stage),
                opt(s.train_loss.map(|v| format!("{v:.4}"))),
                s.loss_history.len(),
                opt(s.steps.map(|v| v.to_string())),
                opt(s.samples.map(|v| v.to_string())),
                opt(s.seconds.map(|v| format!("{v:.1}"))),
                opt(s.test_accuracy.map(|v| format!("{v:.4}"))),
                esc(s.checkpoint.as_deref().unwrap_or("—")),
            );
        }
        self.body.push_str("</table>\n");
        let chart = LineChart {
            title: "Training loss per stage",
            x_desc: "epoch of the stage",
            y_desc: "loss",
            series: stages
                .iter()
                .map(|s| {
                    Series::new(
                        s.stage.clone(),
                        s.loss_history
                            .iter()
                            .enumerate()
                            .map(|(i, l)| (i as f64, Some(*l))),
                    )
                })
                .collect(),
            marks: &[],
        };
        self.charts(vec![(chart.to_svg()?, 0)]);
        Ok(())
    }

    fn config(&mut self, run: &RunData) {
        self.h2("Job config", "config");
        match &run.config {
            Some(text) => {
                let _ = writeln!(self.body, "<pre class=\"config\">{}</pre>", esc(text));
            }
            None => self.para("muted", &format!("No {CONFIG} in the run directory.")),
        }
    }

    fn finish(self, run: &RunData) -> String {
        let name = run.job_name();
        let mut files: Vec<&str> = [SUMMARY, METRICS, STEPS, EVENTS, CONFIG]
            .into_iter()
            .filter(|f| run.dir.join(f).exists())
            .collect();
        files.dedup();
        let mut head = String::new();
        let _ = write!(
            head,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>butler report — {}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
             <h1>{}</h1>\n<p class=\"sub\">{} — from {}</p>\n",
            esc(&name),
            esc(&name),
            esc(&run.dir.display().to_string()),
            esc(&files.join(", ")),
        );
        for n in &self.notes {
            let _ = writeln!(head, "<p class=\"note\">{}</p>", esc(n));
        }
        head + &self.body + "</main>\n</body>\n</html>\n"
    }
}

fn is_loss(tag: &str) -> bool {
    tag.rsplit('/').next().unwrap_or(tag).contains("loss")
}

/// The events drawn on the curves: those of `events.jsonl` of a marked kind, numbered as in the
/// events table; without such events, what the other files tell (a new generation between two lines
/// of `steps.jsonl`, the rounds' boundaries).
fn happenings(run: &RunData, notes: &mut Vec<String>) -> Vec<Happening> {
    let mut out: Vec<Happening> = run
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| mark_color(&e.kind).is_some())
        .map(|(i, e): (usize, &EventRow)| Happening {
            label: (i + 1).to_string(),
            kind: e.kind.clone(),
            epoch: e.epoch.map(|v| v as f64),
            step: e.step.map(|v| v as f64),
        })
        .collect();
    let has = |kind: &str| run.events.iter().any(|e| e.kind == kind);
    let membership = ["regroup", "join", "restart", "resume"]
        .iter()
        .any(|k| has(k));
    if !membership {
        for pair in run.steps.windows(2) {
            if let [a, b] = pair {
                if let (Some(ga), Some(gb)) = (a.generation, b.generation) {
                    if gb != ga {
                        out.push(Happening {
                            label: format!("g{gb}"),
                            kind: "generation".into(),
                            epoch: b.epoch.map(|v| v as f64),
                            step: Some(b.step as f64),
                        });
                    }
                }
            }
        }
        let generation = run
            .summary
            .as_ref()
            .and_then(|s| s.view.generation)
            .unwrap_or(0);
        // A job starts in generation 1; each regroup or resume makes a new one.
        if generation > 1 && run.steps.is_empty() {
            notes.push(format!(
                "The job ended in generation {generation} (it regrouped or resumed), but this run \
                 directory has no {EVENTS} or {STEPS} to say when, so the curves do not mark it."
            ));
        }
    }
    if !has("round") {
        out.extend(round_starts(run));
    }
    out
}

/// Round r's epochs are `r·E .. (r+1)·E` (the worker numbers them so): marks at each round's start.
fn round_starts(run: &RunData) -> Vec<Happening> {
    let Some(rounds) = run.summary.as_ref().and_then(|s| s.view.rounds.as_ref()) else {
        return Vec::new();
    };
    let Some(last) = run.epochs.last() else {
        return Vec::new();
    };
    let total = last.epoch + 1;
    let n = rounds.len() as u64;
    if n < 2 || total % n != 0 {
        return Vec::new();
    }
    let per = total / n;
    (1..n)
        .map(|r| Happening {
            label: format!("r{r}"),
            kind: "round".into(),
            epoch: Some((r * per) as f64),
            step: None,
        })
        .collect()
}

fn marks(happenings: &[Happening], x: impl Fn(&Happening) -> Option<f64>) -> Vec<Mark> {
    happenings
        .iter()
        .filter_map(|h| {
            Some(Mark {
                x: x(h)?,
                label: h.label.clone(),
                kind: h.kind.clone(),
                color: mark_color(&h.kind).unwrap_or(PALETTE[7]),
            })
        })
        .collect()
}

/// Each rank's rows of `steps.jsonl`, with the step they belong to.
fn per_rank(steps: &[StepRow]) -> BTreeMap<u32, Vec<(f64, &super::data::RankRow)>> {
    let mut out: BTreeMap<u32, Vec<_>> = BTreeMap::new();
    for s in steps {
        for r in &s.ranks {
            out.entry(r.rank).or_default().push((s.step as f64, r));
        }
    }
    out
}

#[derive(Default)]
struct RankMeans {
    data: Option<f64>,
    compute: Option<f64>,
    comm: Option<f64>,
    optim: Option<f64>,
    samples_per_second: Option<f64>,
    lateness: Option<f64>,
}

impl RankMeans {
    fn of<'a>(rows: impl Iterator<Item = &'a super::data::RankRow> + Clone) -> RankMeans {
        let mean = |f: fn(&super::data::RankRow) -> Option<f64>| {
            let (sum, n) = rows
                .clone()
                .filter_map(f)
                .filter(|v| v.is_finite())
                .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
            (n > 0).then(|| sum / n as f64)
        };
        RankMeans {
            data: mean(|r| r.data_seconds),
            compute: mean(|r| r.compute_seconds),
            comm: mean(|r| r.comm_seconds),
            optim: mean(|r| r.optim_seconds),
            samples_per_second: mean(|r| r.samples_per_second),
            lateness: mean(|r| r.lateness_seconds),
        }
    }
}

/// A summary value as table text, and whether it is a number (right-aligned).
fn cell(v: &serde_json::Value) -> (String, bool) {
    use serde_json::Value;
    match v {
        Value::Null => ("—".into(), false),
        Value::Bool(b) => (b.to_string(), false),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => (u.to_string(), true),
            (_, Some(i), _) => (i.to_string(), true),
            (_, _, Some(f)) if f.abs() >= 1000.0 => (format!("{f:.1}"), true),
            (_, _, Some(f)) => (format!("{f:.4}"), true),
            _ => (n.to_string(), true),
        },
        Value::String(s) => (s.clone(), false),
        Value::Array(_) | Value::Object(_) => {
            let text = v.to_string();
            if text.len() <= 160 {
                (text, false)
            } else {
                let n = match v {
                    Value::Array(a) => a.len(),
                    Value::Object(o) => o.len(),
                    _ => 0,
                };
                (format!("({n} entries: see {SUMMARY})"), false)
            }
        }
    }
}

/// HTML text and attribute escaping.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"a < b && "c" > 'd'"#),
            "a &lt; b &amp;&amp; &quot;c&quot; &gt; &#39;d&#39;"
        );
    }

    #[test]
    fn summary_cells() {
        assert_eq!(cell(&serde_json::json!(0.91234)), ("0.9123".into(), true));
        assert_eq!(cell(&serde_json::json!(5400.26)), ("5400.3".into(), true));
        assert_eq!(cell(&serde_json::json!(3)), ("3".into(), true));
        assert_eq!(cell(&serde_json::json!(null)), ("—".into(), false));
        let long = serde_json::json!((0..100).collect::<Vec<u32>>());
        assert_eq!(cell(&long).0, format!("(100 entries: see {SUMMARY})"));
    }
}
