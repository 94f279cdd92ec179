//! `fleet-sim`: runs a simulated fleet described by a fleet file and writes
//! its run directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use fleet_aggregation::compute;
use fleet_sim::driver::{RoundLog, Start, run_from};
use fleet_sim::fleet::{Fleet, FleetError};
use fleet_sim::monitor::{self, MonitorOutcome, WindowLog};
use fleet_sim::report::{Summary, human_duration, write_run, write_task};
use indicatif::{ProgressBar, ProgressStyle};

/// Simulate a federated learning fleet on one machine, on a virtual clock.
///
/// With no arguments: 100 devices (phones and tablets with day/night
/// availability and dropouts) holding a Dirichlet(0.5) label split of the
/// embedded Fashion-MNIST subset, 10 reports per round with 30%
/// over-selection, 2NN, 5 local epochs, FedAvg, 100 rounds. Every field is
/// documented in sim/fleets/default.toml.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", version, about, long_about)]
struct Args {
    /// Fleet file (TOML); absent: the built-in default fleet.
    #[arg(long)]
    fleet: Option<PathBuf>,
    /// Override one field of the fleet, e.g. `--set task.rounds=20`,
    /// `--set task.codec=int8`, `--set devices=1000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Run directory for rounds.csv, rounds.json, summary.json, fleet.toml and report.html.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// No progress bar (for logs and scripts).
    #[arg(long)]
    quiet: bool,
    /// After the simulation, run the same fleet over real QUIC on loopback
    /// (a real coordinator and one real agent per device, real time; at most
    /// 1,000 devices, labelled data sets) and compare the final accuracies.
    #[arg(long)]
    network: bool,
    /// Also write `task.json` to the run directory: the initial model, each
    /// device's training examples and the batch order of every aggregated
    /// device in every round, so that another framework can rerun the same
    /// task, batch for batch, with the devices `rounds.json` lists for each
    /// round (`bench/flower_fashion.py --task`).
    #[arg(long)]
    export_task: bool,
    /// Train each update only when its report is due, instead of ahead of
    /// it on the other cores: the same results, slower (for comparing the
    /// two schedules).
    #[arg(long)]
    train_on_demand: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match simulate(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Applies `KEY=VALUE` overrides to a fleet file's TOML table.
fn apply_sets(text: &str, sets: &[String]) -> Result<String, FleetError> {
    if sets.is_empty() {
        return Ok(text.to_string());
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|e| FleetError(e.to_string()))?;
    for set in sets {
        let (key, value) = set.split_once('=').ok_or_else(|| {
            FleetError(format!(
                "--set {set:?}: expected KEY=VALUE, e.g. task.rounds=20"
            ))
        })?;
        // A TOML value (number, boolean, quoted string, array), else a bare string.
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts
            .pop()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| FleetError(format!("--set {set:?}: empty key")))?;
        let mut node = &mut table;
        for part in parts {
            node = node
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| FleetError(format!("--set {set:?}: {part} is not a table")))?;
        }
        node.insert(last.to_string(), value);
    }
    Ok(table.to_string())
}

fn simulate(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let (text, origin) = match &args.fleet {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            path.display().to_string(),
        ),
        None => (String::new(), "built-in default fleet".to_string()),
    };
    let origin = if args.sets.is_empty() {
        origin
    } else {
        format!("{origin} with --set {}", args.sets.join(" --set "))
    };
    let fleet = apply_sets(&text, &args.sets)
        .and_then(|t| Fleet::from_toml(&t))
        .map_err(|e| format!("{origin}: {e}"))?;
    let spinner = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_message("loading data");
    let (data, test) = fleet_sim::data::load(&fleet)?;
    spinner.finish_and_clear();
    let (compute, chosen) = compute::select();
    eprintln!(
        "{origin}: {} devices, {} reports a round ({} selected), {} rounds, {} on {}; {chosen}",
        fleet.devices,
        fleet.task.target,
        fleet.engine_config().cohort(),
        fleet.task.rounds,
        fleet.model_spec().name(),
        match fleet.data {
            fleet_sim::fleet::DataConfig::FashionEmbedded { .. } => "embedded Fashion-MNIST",
            fleet_sim::fleet::DataConfig::FashionFull { .. } => "Fashion-MNIST",
            fleet_sim::fleet::DataConfig::Synthetic { .. } => "Synthetic(α, β), generated lazily",
        }
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(fleet.task.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template("round {pos}/{len} [{elapsed_precise}] {wide_bar} {msg}")
            .map_err(|e| e.to_string())?,
    );
    let sketch = match &fleet.monitor {
        Some(_) => Some(monitor::fit_sketch(&fleet, &data)?),
        None => None,
    };
    let start = Start {
        sketch: sketch.as_ref(),
        no_training_ahead: args.train_on_demand,
        ..Start::default()
    };
    let placement = match fleet.task.dp.map(|d| d.placement) {
        Some(fleet_sim::fleet::Placement::Client) => "client",
        _ => "server",
    };
    let outcome = run_from(
        &fleet,
        &data,
        &test,
        compute.as_ref(),
        start,
        |log: &RoundLog| {
            bar.set_message(format!(
                "acc {:.2}% loss {:.3}{} virtual {}",
                100.0 * log.accuracy,
                log.loss,
                log.epsilon
                    .map(|e| format!(" ε {e:.3} ({placement} noise, no amplification)"))
                    .unwrap_or_else(|| " ε ∞ (no task.dp)".into()),
                human_duration(log.virtual_s)
            ));
            bar.inc(1);
        },
    )?;
    bar.finish();
    let drift = match (&fleet.monitor, &sketch) {
        (Some(m), Some(sketch)) => Some(monitoring(
            args,
            &fleet,
            m.windows,
            &data,
            &test,
            compute.as_ref(),
            sketch,
            &outcome,
        )?),
        _ => None,
    };
    let summary = Summary::new(&fleet, &outcome, started.elapsed().as_secs_f64());
    write_run(&args.out, &fleet, &outcome, &summary, drift.as_ref())?;
    if args.export_task {
        write_task(&args.out, &fleet, &data, &outcome)?;
    }
    if let Some(reason) = &outcome.stopped {
        eprintln!("{reason}");
    }
    println!(
        "{} rounds, final test accuracy {}; wall {:.2} s (median round {:.4} s), virtual {}; \
         peak RSS {}; {} bytes per idle device; report in {}",
        summary.rounds,
        summary
            .final_accuracy
            .map(|a| format!("{:.2}%", 100.0 * a))
            .unwrap_or_else(|| "none".into()),
        summary.total_wall_s,
        summary.median_round_wall_s,
        human_duration(summary.virtual_s),
        summary
            .peak_rss_bytes
            .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "unknown".into()),
        summary.bytes_per_idle_device,
        args.out.join("report.html").display()
    );
    if let Some(e) = summary.epsilon {
        println!("ε = {e:.4} after the last round, assuming:");
        for line in &summary.privacy_assumptions {
            println!("  - {line}");
        }
    }
    if args.network {
        network(
            args,
            &fleet,
            &data,
            &test,
            compute.as_ref(),
            summary.final_accuracy,
        )?;
    }
    Ok(())
}

/// The real-network run of the same fleet, and the comparison.
/// The monitoring phase after training, with its progress bar and summary lines.
#[allow(clippy::too_many_arguments)]
fn monitoring(
    args: &Args,
    fleet: &Fleet,
    windows: u64,
    data: &fleet_sim::data::DeviceData,
    test: &fleet_models::Dataset,
    compute: &dyn fleet_aggregation::Compute,
    sketch: &fleet_drift::Sketcher,
    trained: &fleet_sim::driver::Outcome,
) -> Result<MonitorOutcome, String> {
    let training = trained
        .training
        .clone()
        .ok_or("training closed no round with reports: no drift reference")?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(windows)
    };
    bar.set_style(
        ProgressStyle::with_template("window {pos}/{len} [{elapsed_precise}] {wide_bar} {msg}")
            .map_err(|e| e.to_string())?,
    );
    let d = monitor::run(
        fleet,
        data,
        test,
        compute,
        sketch,
        trained.global.clone(),
        training,
        |w: &WindowLog| {
            for e in &w.events {
                bar.println(format!("window {}: {e}", w.window));
            }
            if let Some(r) = &w.retrain {
                bar.println(format!("window {}: retraining: {r}", w.window));
            }
            bar.set_message(format!(
                "fleet PSI {} served accuracy {}",
                w.fleet
                    .as_ref()
                    .map_or("—".into(), |s| format!("{:.3}", s.covariate_psi)),
                w.other_accuracy
                    .map_or("—".into(), |a| format!("{:.2}%", 100.0 * a))
            ));
            bar.inc(1);
        },
    )?;
    bar.finish();
    let when = |w: Option<u64>| match (w, d.delay(w)) {
        (Some(w), Some(delay)) => format!("window {w}, {delay} windows after the drift began"),
        _ => "not detected".into(),
    };
    if let Some(from) = d.drift_from {
        println!(
            "drift from window {from}: fleet flagged {}; cohort {}; {} other cohorts flagged",
            when(d.fleet_detected),
            d.cohort_detected
                .as_ref()
                .map_or("not named".into(), |(w, name)| format!(
                    "{name} named {}",
                    when(Some(*w))
                )),
            d.wrong_cohorts
        );
    }
    let pct = |a: Option<f64>| a.map_or("—".into(), |a| format!("{:.2}%", 100.0 * a));
    println!(
        "{} windows, {} false alarms, {} retrainings; drifting devices' accuracy {} before drift, {} at the end",
        d.windows.len(),
        d.false_alarms,
        d.retrain_rounds.len(),
        pct(d.pre_drift_accuracy),
        pct(d.final_drifting_accuracy)
    );
    Ok(d)
}

fn network(
    args: &Args,
    fleet: &Fleet,
    data: &fleet_sim::data::DeviceData,
    test: &fleet_models::Dataset,
    compute: &dyn fleet_aggregation::Compute,
    in_memory: Option<f32>,
) -> Result<(), String> {
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(fleet.task.rounds)
    };
    bar.set_style(
        ProgressStyle::with_template("network round {pos}/{len} [{elapsed_precise}] {wide_bar}")
            .map_err(|e| e.to_string())?,
    );
    let started = Instant::now();
    let dir = args.out.join("network");
    let run = fleet_sim::network::run(fleet, data, test, &dir, |closed, _| {
        bar.set_position(closed)
    })?;
    bar.finish();
    let wall = started.elapsed().as_secs_f64();
    let rounds = &run.rounds;
    let replayed = match fleet_sim::network::replay(fleet, data, test, compute, &run) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("network mode: no in-memory replay ({e})");
            None
        }
    };
    let mut csv = String::from(
        "round,participants,accuracy,loss,epsilon,replay_accuracy,replay_max_abs_diff,devices\n",
    );
    for (i, r) in rounds.iter().enumerate() {
        let rep = replayed.as_ref().and_then(|p| p.get(i));
        csv += &format!(
            "{},{},{},{},{},{},{},{}\n",
            r.round,
            r.devices.len(),
            r.accuracy,
            r.loss,
            r.epsilon.map(|e| e.to_string()).unwrap_or_default(),
            rep.map(|p| p.accuracy.to_string()).unwrap_or_default(),
            rep.map(|p| p.max_abs_diff.to_string()).unwrap_or_default(),
            r.devices
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    let path = args.out.join("network-rounds.csv");
    std::fs::write(&path, csv).map_err(|e| format!("{}: {e}", path.display()))?;
    let last = rounds.last().map(|r| r.accuracy);
    println!(
        "network mode: {} rounds over QUIC in {wall:.1} s, final test accuracy {}{}; rounds in {}",
        rounds.len(),
        last.map_or("none".into(), |a| format!("{:.2}%", 100.0 * a)),
        match (last, in_memory) {
            (Some(n), Some(m)) =>
                format!(" ({:+.2} points against the simulation)", 100.0 * (n - m)),
            _ => String::new(),
        },
        path.display()
    );
    if let Some(p) = &replayed {
        let max_diff = p.iter().map(|r| r.max_abs_diff).fold(0.0f32, f32::max);
        let max_acc = p
            .iter()
            .zip(rounds)
            .map(|(a, b)| (a.accuracy - b.accuracy).abs())
            .fold(0.0f32, f32::max);
        println!(
            "in-memory replay of the network's rounds (same devices, same seeds): largest parameter difference {max_diff:.3e}, \
             largest accuracy difference {:.2} points",
            100.0 * max_acc
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_override_fields_and_keep_the_rest() {
        let text = "devices = 50\n[task]\nepochs = 2\n";
        let sets = [
            "task.rounds=7".to_string(),
            "task.codec=int8".to_string(),
            "data.set=\"fashion-full\"".to_string(),
        ];
        let fleet = Fleet::from_toml(&apply_sets(text, &sets).unwrap()).unwrap();
        assert_eq!(
            (fleet.devices, fleet.task.epochs, fleet.task.rounds),
            (50, 2, 7)
        );
        assert_eq!(fleet.task.codec, fleet_sim::fleet::CodecKind::Int8);
    }

    #[test]
    fn malformed_sets_are_explained() {
        let e = apply_sets("", &["task.rounds".into()]).unwrap_err().0;
        assert!(e.contains("KEY=VALUE"), "{e}");
        let e = apply_sets("[task]\nrounds = 3\n", &["task.rounds.x=1".into()])
            .unwrap_err()
            .0;
        assert!(e.contains("rounds is not a table"), "{e}");
        // A value of the wrong kind is caught by the fleet file's own checks.
        let t = apply_sets("", &["task.rounds=many".into()]).unwrap();
        let e = Fleet::from_toml(&t).unwrap_err().0;
        assert!(e.contains("rounds"), "{e}");
    }
}
