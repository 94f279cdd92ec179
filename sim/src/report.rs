//! The run directory: `rounds.csv`, `rounds.json`, `summary.json`, the
//! effective `fleet.toml`, with monitoring `drift.csv` and `drift.json`, and
//! `report.html`, a self-contained page whose
//! plots are inline SVG drawn with `plotters` (SVG backend only, so no font
//! or image libraries are linked; text is laid out by the browser).
//! On request, `task.json` exports what another framework needs to rerun
//! the same task: the initial model and each device's examples.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::data::DeviceData;
use crate::driver::{Outcome, RoundLog, initial_global};
use crate::fleet::Fleet;
use crate::monitor::{MonitorOutcome, WindowLog};
use fleet_edge_agent::work::training_seed;

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// `(x, y)` points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A line chart as an SVG document; with `from_zero` the y axis starts at 0
/// (for counts and sizes) unless a value is negative.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    from_zero: bool,
) -> Result<String, String> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = all.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if from_zero && y0 >= 0.0 {
        y0 = 0.0;
    }
    // Nearly constant series still get a readable range.
    let pad = (0.05 * (y1 - y0))
        .max(0.02 * y0.abs().max(y1.abs()))
        .max(1e-6);
    let y0 = if from_zero && y0 == 0.0 {
        0.0
    } else {
        y0 - pad
    };
    let y1 = y1 + pad;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 380)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| format!("plot {title:?}: {e}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .x_label_formatter(&|x| {
                if x.fract() == 0.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.1}")
                }
            })
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().filter(finite).copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The CSV log: one row per closed round.
pub fn csv(logs: &[RoundLog]) -> String {
    let mut out = String::from(
        "round,accuracy,loss,train_loss,selected,participants,dropouts,refused,rejected,bounded,\
         abandoned,checkins,bytes_up,bytes_down,virtual_s,round_virtual_s,wall_s,epsilon\n",
    );
    for l in logs {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.6},{}",
            l.round,
            l.accuracy,
            l.loss,
            l.train_loss,
            l.selected,
            l.participants,
            l.dropouts,
            l.refused,
            l.rejected,
            l.bounded,
            l.abandoned,
            l.checkins,
            l.bytes_up,
            l.bytes_down,
            l.virtual_s,
            l.round_virtual_s,
            l.wall_s,
            l.epsilon.map(|e| e.to_string()).unwrap_or_default()
        );
    }
    out
}

/// Whole-run figures written to `summary.json` and shown in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Registered devices.
    pub devices: u32,
    /// Rounds closed.
    pub rounds: usize,
    /// Test accuracy after the last round.
    pub final_accuracy: Option<f32>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// Wall-clock seconds of the whole process so far (data loading included).
    pub total_wall_s: f64,
    /// Wall-clock seconds of the event loop.
    pub loop_wall_s: f64,
    /// Median wall-clock seconds of a round.
    pub median_round_wall_s: f64,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
    /// Events processed.
    pub events: u64,
    /// Local trainings run.
    pub trainings: u64,
    /// Peak resident set size of the process (bytes), where the OS tells it.
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of one idle device's state (its check-in queue entry).
    pub bytes_per_idle_device: usize,
    /// Bytes the check-in queue reserved at its largest.
    pub queue_bytes: usize,
    /// ε spent after the last round, when the task is private.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// What that ε assumes (noise placement, trust, no amplification);
    /// empty when the task is not private.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub privacy_assumptions: Vec<String>,
}

impl Summary {
    /// The summary of `outcome`; `total_wall_s` is measured by the caller.
    pub fn new(fleet: &Fleet, outcome: &Outcome, total_wall_s: f64) -> Self {
        let mut walls: Vec<f64> = outcome.logs.iter().map(|l| l.wall_s).collect();
        walls.sort_by(f64::total_cmp);
        let median = match walls.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => walls[n / 2],
            n => (walls[n / 2 - 1] + walls[n / 2]) / 2.0,
        };
        Self {
            devices: fleet.devices,
            rounds: outcome.logs.len(),
            final_accuracy: outcome.logs.last().map(|l| l.accuracy),
            stopped: outcome.stopped.clone(),
            total_wall_s,
            loop_wall_s: outcome.stats.wall_s,
            median_round_wall_s: median,
            virtual_s: outcome.stats.virtual_s,
            events: outcome.stats.events,
            trainings: outcome.stats.trainings,
            peak_rss_bytes: crate::memory::peak_rss(),
            bytes_per_idle_device: outcome.stats.bytes_per_idle_device,
            queue_bytes: outcome.stats.queue_bytes,
            epsilon: outcome.logs.last().and_then(|l| l.epsilon),
            privacy_assumptions: fleet.task_spec().privacy_assumptions(),
        }
    }
}

/// A duration in seconds as `41.2 s`, `12.5 min` or `5.1 h`.
pub fn human_duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The self-contained HTML report.
pub fn html(
    fleet: &Fleet,
    fleet_toml: &str,
    logs: &[RoundLog],
    summary: &Summary,
    drift: Option<&MonitorOutcome>,
) -> Result<String, String> {
    let series = |name: &str, f: &dyn Fn(&RoundLog) -> f64| Series {
        name: name.into(),
        points: logs.iter().map(|l| (l.round as f64, f(l))).collect(),
    };
    let mut charts = vec![
        line_chart(
            "Global model on the test set",
            "round",
            "accuracy (%)",
            &[series("test accuracy", &|l| 100.0 * f64::from(l.accuracy))],
            false,
        )?,
        line_chart(
            "Loss",
            "round",
            "cross-entropy",
            &[
                series("test loss", &|l| f64::from(l.loss)),
                series("local training loss", &|l| f64::from(l.train_loss)),
            ],
            false,
        )?,
    ];
    if logs.iter().any(|l| l.epsilon.is_some()) {
        charts.push(line_chart(
            "Privacy spent",
            "round",
            "ε",
            &[series("ε (PLD accountant)", &|l| {
                l.epsilon.unwrap_or(f64::NAN)
            })],
            true,
        )?);
    }
    charts.push(line_chart(
        "Participation",
        "round",
        "devices",
        &[
            series("selected", &|l| l.selected as f64),
            series("reports accepted", &|l| l.participants as f64),
            series("dropouts", &|l| l.dropouts as f64),
            series("refused (stragglers)", &|l| l.refused as f64),
        ],
        true,
    )?);
    charts.push(line_chart(
        "Traffic",
        "round",
        "MB per round",
        &[
            series("down (models)", &|l| l.bytes_down as f64 / 1e6),
            series("up (updates)", &|l| l.bytes_up as f64 / 1e6),
        ],
        true,
    )?);
    charts.push(line_chart(
        "Time",
        "round",
        "virtual s, wall ms per round",
        &[
            series("virtual", &|l| l.round_virtual_s),
            series("wall clock (ms)", &|l| 1000.0 * l.wall_s),
        ],
        true,
    )?);
    if let Some(d) = drift {
        charts.extend(drift_charts(fleet, d)?);
    }
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>fleet-sim report</title><style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}}\
         td,th{{padding:2px 10px;text-align:left}}pre{{background:#f4f4f4;padding:8px;overflow:auto}}</style>\
         </head><body><h1>Simulated fleet</h1><table>"
    );
    let row = |page: &mut String, k: &str, v: String| {
        let _ = write!(
            page,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        );
    };
    row(&mut page, "devices", fleet.devices.to_string());
    row(&mut page, "model", fleet.model_spec().name());
    row(&mut page, "rounds closed", summary.rounds.to_string());
    row(
        &mut page,
        "final test accuracy",
        summary
            .final_accuracy
            .map(|a| format!("{:.2}%", 100.0 * a))
            .unwrap_or_else(|| "—".into()),
    );
    if let Some(s) = &summary.stopped {
        row(&mut page, "stopped", s.clone());
    }
    if let Some(e) = summary.epsilon {
        let delta = fleet.task.dp.map_or(f64::NAN, |d| d.delta);
        row(&mut page, "ε spent", format!("{e:.4} at δ = {delta:e}"));
        row(
            &mut page,
            "ε assumes",
            summary.privacy_assumptions.join("; "),
        );
    }
    row(
        &mut page,
        "wall time",
        format!(
            "{:.2} s (event loop {:.2} s, median round {:.3} s)",
            summary.total_wall_s, summary.loop_wall_s, summary.median_round_wall_s
        ),
    );
    row(&mut page, "virtual time", human_duration(summary.virtual_s));
    row(
        &mut page,
        "events / trainings",
        format!("{} / {}", summary.events, summary.trainings),
    );
    if let Some(b) = summary.peak_rss_bytes {
        row(
            &mut page,
            "peak RSS",
            format!("{:.1} MiB", b as f64 / 1048576.0),
        );
    }
    row(
        &mut page,
        "idle device state",
        format!(
            "{} bytes (check-in queue: {:.1} MiB reserved)",
            summary.bytes_per_idle_device,
            summary.queue_bytes as f64 / 1048576.0
        ),
    );
    if let Some(d) = drift {
        drift_rows(&mut page, d, &row);
    }
    page.push_str("</table>\n");
    for svg in charts {
        page.push_str("<figure>");
        page.push_str(&svg);
        page.push_str("</figure>\n");
    }
    let _ = writeln!(
        page,
        "<h2>Fleet file (effective)</h2><pre>{}</pre></body></html>",
        escape(fleet_toml)
    );
    Ok(page)
}

/// Rows of the report's table about the monitoring phase.
fn drift_rows(page: &mut String, d: &MonitorOutcome, row: &dyn Fn(&mut String, &str, String)) {
    let windows = |w: Option<u64>| match (w, d.delay(w)) {
        (Some(w), Some(delay)) => format!("window {w} ({delay} windows after the drift began)"),
        _ => "not detected".into(),
    };
    row(page, "monitoring windows", d.windows.len().to_string());
    if let Some(from) = d.drift_from {
        row(page, "drift from", format!("window {from}"));
        row(page, "fleet flagged", windows(d.fleet_detected));
        row(
            page,
            "drifting cohort named",
            match &d.cohort_detected {
                Some((w, name)) => format!("{name}: {}", windows(Some(*w))),
                None => "not named".into(),
            },
        );
    }
    row(page, "false alarms", d.false_alarms.to_string());
    row(page, "retrainings", d.retrain_rounds.len().to_string());
    let pct = |a: Option<f64>| a.map_or("—".into(), |a| format!("{:.2}%", 100.0 * a));
    if d.drift_from.is_some() {
        row(
            page,
            "drifting devices' accuracy before drift",
            pct(d.pre_drift_accuracy),
        );
        row(
            page,
            "… over the last 3 windows",
            pct(d.final_drifting_accuracy),
        );
    }
}

/// Charts of the monitoring phase: scores by cohort, accuracy of drifting and other devices.
fn drift_charts(fleet: &Fleet, d: &MonitorOutcome) -> Result<Vec<String>, String> {
    let m = fleet.monitor.as_ref().ok_or("no [monitor] table")?;
    let x = |w: &WindowLog| w.window as f64;
    let cohort_series = |pick: &dyn Fn(&WindowLog, usize) -> Option<f64>| {
        (0..m.cohorts as usize)
            .map(|k| Series {
                name: format!("cohort-{k}"),
                points: d
                    .windows
                    .iter()
                    .map(|w| (x(w), pick(w, k).unwrap_or(f64::NAN)))
                    .collect(),
            })
            .collect::<Vec<_>>()
    };
    let threshold = |name: &str, v: f64| Series {
        name: name.into(),
        points: d.windows.iter().map(|w| (x(w), v)).collect(),
    };
    let mut cov = vec![Series {
        name: "fleet".into(),
        points: d
            .windows
            .iter()
            .map(|w| (x(w), w.fleet.as_ref().map_or(f64::NAN, |s| s.covariate_psi)))
            .collect(),
    }];
    cov.extend(cohort_series(&|w, k| w.cohort_covariate[k]));
    cov.push(threshold("raise threshold", m.thresholds.covariate.raise));
    let mut label = vec![Series {
        name: "fleet".into(),
        points: d
            .windows
            .iter()
            .map(|w| {
                (
                    x(w),
                    w.fleet
                        .as_ref()
                        .and_then(|s| s.label_psi)
                        .unwrap_or(f64::NAN),
                )
            })
            .collect(),
    }];
    label.extend(cohort_series(&|w, k| w.cohort_label[k]));
    label.push(threshold("raise threshold", m.thresholds.label.raise));
    let acc = |name: &str, f: &dyn Fn(&WindowLog) -> Option<f64>| Series {
        name: name.into(),
        points: d
            .windows
            .iter()
            .map(|w| (x(w), f(w).map_or(f64::NAN, |a| 100.0 * a)))
            .collect(),
    };
    let retrains: Vec<f64> = d
        .windows
        .iter()
        .filter(|w| w.retrain.is_some())
        .map(|w| w.window as f64)
        .collect();
    let mut accuracy = vec![
        acc("drifting devices", &|w| w.drifting_accuracy),
        acc("other devices", &|w| w.other_accuracy),
    ];
    if let Some(pre) = d.pre_drift_accuracy {
        accuracy.push(threshold(
            "drifting, before drift − 3 points",
            100.0 * pre - 3.0,
        ));
    }
    let title = if retrains.is_empty() {
        "Accuracy of served predictions".to_string()
    } else {
        format!(
            "Accuracy of served predictions (retraining after window {})",
            retrains
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(vec![
        line_chart(
            "Covariate drift: largest feature PSI",
            "window",
            "PSI",
            &cov,
            true,
        )?,
        line_chart(
            "Label drift: PSI of predicted classes",
            "window",
            "PSI",
            &label,
            true,
        )?,
        line_chart(&title, "window", "accuracy (%)", &accuracy, false)?,
    ])
}

/// The monitoring log as CSV: one row per window.
pub fn drift_csv(d: &MonitorOutcome) -> String {
    let mut out = String::from(
        "window,version,drift_active,reports,fleet_covariate_psi,fleet_covariate_js,fleet_covariate_ks,\
         fleet_label_psi,fleet_confidence_psi,fleet_accuracy_drop,cohort_covariate_psi,\
         drifting_accuracy,other_accuracy,max_summary_bytes,events,retrain\n",
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for w in &d.windows {
        let f = w.fleet.as_ref();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},\"{}\",{},{},{},\"{}\",\"{}\"",
            w.window,
            w.version,
            w.drift_active,
            w.reports,
            opt(f.map(|s| s.covariate_psi)),
            opt(f.map(|s| s.covariate_js)),
            opt(f.map(|s| s.covariate_ks)),
            opt(f.and_then(|s| s.label_psi)),
            opt(f.and_then(|s| s.confidence_psi)),
            opt(f.and_then(|s| s.accuracy_drop)),
            w.cohort_covariate
                .iter()
                .map(|v| opt(*v))
                .collect::<Vec<_>>()
                .join(" "),
            opt(w.drifting_accuracy),
            opt(w.other_accuracy),
            w.max_summary_bytes,
            w.events.join("; "),
            w.retrain.clone().unwrap_or_default()
        );
    }
    out
}

/// Writes the whole run directory.
pub fn write_run(
    dir: &Path,
    fleet: &Fleet,
    outcome: &Outcome,
    summary: &Summary,
    drift: Option<&MonitorOutcome>,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text)
            .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
    };
    let fleet_toml = toml::to_string(fleet).map_err(|e| format!("fleet.toml: {e}"))?;
    write("fleet.toml", &fleet_toml)?;
    write("rounds.csv", &csv(&outcome.logs))?;
    write(
        "rounds.json",
        &serde_json::to_string_pretty(&outcome.logs).map_err(|e| e.to_string())?,
    )?;
    write(
        "summary.json",
        &serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?,
    )?;
    write(
        "report.html",
        &html(fleet, &fleet_toml, &outcome.logs, summary, drift)?,
    )?;
    if let Some(d) = drift {
        write("drift.csv", &drift_csv(d))?;
        write(
            "drift.json",
            &serde_json::to_string_pretty(d).map_err(|e| e.to_string())?,
        )?;
    }
    Ok(())
}

/// The task as another framework needs it to run the same experiment.
#[derive(Debug, Serialize)]
struct TaskExport<'a> {
    /// The model's name (`logreg`, `2nn`, `cnn`).
    model: String,
    /// The fleet's seed.
    seed: u64,
    /// Where each tensor lives in `initial` (dense weights are `[inputs, outputs]`).
    layout: &'a [fleet_models::spec::ParamEntry],
    /// The first global model, flat.
    initial: &'a [f32],
    /// `devices[k]`: indices into the training set of device `k`'s
    /// examples (absent for generated data sets).
    devices: Option<&'a [Vec<usize>]>,
    /// `orders[r][k]`: for each epoch, the order in which device `k` visited
    /// its examples (positions in `devices[k]`) in round `r + 1`, for the
    /// devices aggregated in that round.
    orders: Vec<std::collections::BTreeMap<u32, Vec<Vec<usize>>>>,
}

/// Writes `dir/task.json`: the initial global model with its layout, for
/// partitioned data sets each device's training examples, and the batch
/// order of every device aggregated in each round of `outcome`. With the
/// devices listed per round in `rounds.json`, this is enough to replay the
/// run in another framework, batch for batch (see
/// `bench/flower_fashion.py --task`).
pub fn write_task(
    dir: &Path,
    fleet: &Fleet,
    data: &DeviceData,
    outcome: &Outcome,
) -> Result<(), String> {
    let spec = fleet.model_spec();
    let layout = spec.layout();
    let initial = initial_global(fleet);
    let orders = outcome
        .logs
        .iter()
        .map(|log| {
            log.devices
                .iter()
                .map(|&device| {
                    let mut order = fleet_models::EpochOrder::new(
                        training_seed(fleet.train_config().seed, u64::from(device), log.round),
                        data.examples(device),
                    );
                    let epochs = (0..fleet.task.epochs)
                        .map(|_| order.next_epoch().to_vec())
                        .collect();
                    (device, epochs)
                })
                .collect()
        })
        .collect();
    let export = TaskExport {
        model: spec.name(),
        seed: fleet.seed,
        layout: &layout.entries,
        initial: &initial,
        devices: match data {
            DeviceData::Partitioned { devices, .. } => Some(devices),
            DeviceData::Synthetic { .. } => None,
        },
        orders,
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("task.json");
    let text = serde_json::to_string(&export).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_legend() {
        let svg = line_chart(
            "t",
            "round",
            "y",
            &[Series {
                name: "accuracy curve".into(),
                points: vec![(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.7)],
            }],
            false,
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("accuracy curve"));
        // Empty series still give a valid chart.
        assert!(
            line_chart("e", "x", "y", &[], true)
                .unwrap()
                .contains("</svg>")
        );
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(human_duration(41.24), "41.2 s");
        assert_eq!(human_duration(750.0), "12.5 min");
        assert_eq!(human_duration(5.0 * 3600.0), "5.0 h");
    }
}
