//! `coordinator privacy …`: the privacy calculator for people planning a task.
//!
//! Both commands model `rounds` rounds of DP-FedAvg in which each of the
//! population's devices takes part independently with probability
//! `sampling-rate` and the sum of clipped updates gets Gaussian noise of
//! `noise-multiplier` × clip norm, and print the ε of the RDP and the PLD
//! accountants (`fleet_aggregation::privacy::accountant`). Every number
//! printed is computed by those accountants.

use clap::{Args, Subcommand, ValueEnum};
use fleet_aggregation::privacy::accountant::{
    AccountingMethod, SubsampledGaussian, epsilon_pld, epsilon_rdp, noise_multiplier_for_epsilon,
};
use serde::Serialize;

/// Privacy calculator commands.
#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// ε spent by a task, from its sampling rate, noise multiplier and rounds.
    ///
    /// Example: coordinator privacy epsilon --sampling-rate 0.01 --noise-multiplier 1.1 --rounds 1000 --delta 1e-5
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier that keeps a task within a target ε.
    ///
    /// Example: coordinator privacy noise --target-epsilon 2 --sampling-rate 0.01 --rounds 1000 --delta 1e-5
    Noise(NoiseArgs),
}

/// Arguments of `privacy epsilon`.
#[derive(Debug, Args)]
pub struct EpsilonArgs {
    /// Probability that a given device takes part in a round (cohort / population), in (0, 1].
    #[arg(long, short = 'q')]
    pub sampling_rate: f64,
    /// Noise standard deviation divided by the clipping norm (z), > 0.
    #[arg(long, short = 'z')]
    pub noise_multiplier: f64,
    /// Number of rounds, ≥ 1.
    #[arg(long, short = 't')]
    pub rounds: u64,
    /// δ of the (ε, δ) guarantee, in (0, 1); usually below 1/population.
    #[arg(long, short = 'd', default_value_t = 1e-5)]
    pub delta: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which accountant `privacy noise` calibrates with.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Method {
    /// Rényi DP.
    Rdp,
    /// Privacy-loss distributions (tighter).
    Pld,
}

/// Arguments of `privacy noise`.
#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// The ε not to exceed, > 0.
    #[arg(long, short = 'e')]
    pub target_epsilon: f64,
    /// Probability that a given device takes part in a round, in (0, 1].
    #[arg(long, short = 'q')]
    pub sampling_rate: f64,
    /// Number of rounds, ≥ 1.
    #[arg(long, short = 't')]
    pub rounds: u64,
    /// δ of the (ε, δ) guarantee, in (0, 1).
    #[arg(long, short = 'd', default_value_t = 1e-5)]
    pub delta: f64,
    /// Accountant used to calibrate.
    #[arg(long, value_enum, default_value_t = Method::Pld)]
    pub method: Method,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct EpsilonOut {
    sampling_rate: f64,
    noise_multiplier: f64,
    rounds: u64,
    delta: f64,
    epsilon_rdp: f64,
    rdp_order: f64,
    epsilon_pld: f64,
}

#[derive(Debug, Serialize)]
struct NoiseOut {
    target_epsilon: f64,
    sampling_rate: f64,
    rounds: u64,
    delta: f64,
    method: &'static str,
    noise_multiplier: f64,
    epsilon_rdp: f64,
    epsilon_pld: f64,
}

fn epsilons(m: &SubsampledGaussian, delta: f64) -> Result<(f64, f64, f64), String> {
    let rdp = epsilon_rdp(m, delta).map_err(|e| e.to_string())?;
    let pld = epsilon_pld(m, delta).map_err(|e| e.to_string())?;
    Ok((rdp.epsilon, rdp.order, pld))
}

fn print_json(out: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(out).expect("plain struct")
    );
}

/// Runs a privacy command.
pub fn run(cmd: PrivacyCommand) -> Result<(), String> {
    match cmd {
        PrivacyCommand::Epsilon(a) => {
            let m = SubsampledGaussian::new(a.sampling_rate, a.noise_multiplier, a.rounds)
                .map_err(|e| e.to_string())?;
            let (rdp, order, pld) = epsilons(&m, a.delta)?;
            let out = EpsilonOut {
                sampling_rate: a.sampling_rate,
                noise_multiplier: a.noise_multiplier,
                rounds: a.rounds,
                delta: a.delta,
                epsilon_rdp: rdp,
                rdp_order: order,
                epsilon_pld: pld,
            };
            if a.json {
                print_json(&out);
            } else {
                println!(
                    "{} rounds, sampling rate {}, noise multiplier {}, δ = {:e}",
                    a.rounds, a.sampling_rate, a.noise_multiplier, a.delta
                );
                println!("  ε (RDP, order {order}) = {rdp:.4}");
                println!("  ε (PLD)              = {pld:.4}");
                println!("Both are upper bounds; the smaller one holds.");
            }
        }
        PrivacyCommand::Noise(a) => {
            let method = match a.method {
                Method::Rdp => AccountingMethod::Rdp,
                Method::Pld => AccountingMethod::Pld,
            };
            let z = noise_multiplier_for_epsilon(
                a.target_epsilon,
                a.delta,
                a.sampling_rate,
                a.rounds,
                method,
            )
            .map_err(|e| e.to_string())?;
            let m =
                SubsampledGaussian::new(a.sampling_rate, z, a.rounds).map_err(|e| e.to_string())?;
            let (rdp, _, pld) = epsilons(&m, a.delta)?;
            let out = NoiseOut {
                target_epsilon: a.target_epsilon,
                sampling_rate: a.sampling_rate,
                rounds: a.rounds,
                delta: a.delta,
                method: match a.method {
                    Method::Rdp => "rdp",
                    Method::Pld => "pld",
                },
                noise_multiplier: z,
                epsilon_rdp: rdp,
                epsilon_pld: pld,
            };
            if a.json {
                print_json(&out);
            } else {
                println!(
                    "noise multiplier {z:.4} keeps {} rounds at sampling rate {} within ε = {} (δ = {:e})",
                    a.rounds, a.sampling_rate, a.target_epsilon, a.delta
                );
                println!("  with it: ε (RDP) = {rdp:.4}, ε (PLD) = {pld:.4}");
            }
        }
    }
    Ok(())
}
