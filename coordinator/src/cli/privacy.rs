//! `coordinator privacy …`: the privacy calculator for people planning a task.
//!
//! Both commands model `rounds` rounds of DP-FedAvg in which the sum of
//! clipped updates gets Gaussian noise of `noise-multiplier` × clip norm,
//! and print the ε of the RDP and the PLD accountants
//! (`fleet_aggregation::privacy::accountant`). Every number printed is
//! computed by those accountants, next to what it assumes.
//!
//! The sampling rate defaults to 1, as the coordinator charges it: it does
//! not sample devices Poisson style, so no amplification by sampling is
//! claimed. A smaller `--sampling-rate` is still accepted for planning,
//! and the output then says that its ε assumes Poisson sampling the
//! coordinator does not perform. With `--placement client` the output
//! also gives the ε one update has against the coordinator itself (no
//! secure aggregation), from its own noise multiplier `z/√m`. With
//! `--max-participations k` (a task's participation limit, which the
//! coordinator enforces) a device is charged its own rounds only: `k` full
//! steps instead of `rounds`.

use clap::{Args, Subcommand, ValueEnum};
use fleet_aggregation::privacy::accountant::{
    AccountantError, AccountingMethod, SubsampledGaussian, epsilon_pld, epsilon_rdp,
    noise_multiplier_for_epsilon,
};
use serde::Serialize;

/// Privacy calculator commands.
#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// ε spent by a task, from its sampling rate, noise multiplier and rounds.
    ///
    /// Example: coordinator privacy epsilon --noise-multiplier 1.1 --rounds 100 --delta 1e-5
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier that keeps a task within a target ε.
    ///
    /// Example: coordinator privacy noise --target-epsilon 8 --rounds 100 --delta 1e-5
    Noise(NoiseArgs),
}

/// Where the noise is added, for the calculator's statement of assumptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    /// On the server, on the sum (the coordinator is trusted).
    Server,
    /// On each device, z/√cohort each (no secure aggregation).
    Client,
}

/// What the ε depends on besides z, T and δ.
#[derive(Debug, Args)]
pub struct Setting {
    /// Probability that a given device takes part in a round, in (0, 1].
    /// Default 1: the coordinator charges every round in full. Below 1 the
    /// ε assumes Poisson sampling, which the coordinator does not perform.
    #[arg(long, short = 'q', default_value_t = 1.0)]
    pub sampling_rate: f64,
    /// Where the noise is added: server (default) or client.
    #[arg(long, value_enum, default_value_t = Placement::Server)]
    pub placement: Placement,
    /// Devices per round m (the target), for client placement: each update
    /// then carries noise multiplier z/√m, which is all the coordinator faces.
    #[arg(long, short = 'm')]
    pub cohort: Option<usize>,
    /// Most rounds one device takes part in (the task's
    /// `--max-participations`, enforced by the coordinator): each device is
    /// charged min(k, rounds) full steps. Needs a sampling rate of 1.
    #[arg(long, short = 'k')]
    pub max_participations: Option<u64>,
}

/// Arguments of `privacy epsilon`.
#[derive(Debug, Args)]
pub struct EpsilonArgs {
    /// Sampling rate, placement, cohort.
    #[command(flatten)]
    pub setting: Setting,
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
    /// Sampling rate, placement, cohort.
    #[command(flatten)]
    pub setting: Setting,
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
    /// Rounds charged to the device that takes part most often.
    charged_rounds: u64,
    delta: f64,
    epsilon_rdp: f64,
    rdp_order: f64,
    epsilon_pld: f64,
    placement: &'static str,
    /// With client noise: what one update carries against the coordinator.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_update: Option<PerUpdate>,
    assumptions: Vec<String>,
}

#[derive(Debug, Serialize)]
struct NoiseOut {
    target_epsilon: f64,
    sampling_rate: f64,
    rounds: u64,
    /// Rounds charged to the device that takes part most often.
    charged_rounds: u64,
    delta: f64,
    method: &'static str,
    noise_multiplier: f64,
    epsilon_rdp: f64,
    epsilon_pld: f64,
    placement: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_update: Option<PerUpdate>,
    assumptions: Vec<String>,
}

/// One update against the coordinator, with client noise and no secure
/// aggregation: noise multiplier `z/√m`, every round in full.
#[derive(Debug, Serialize)]
struct PerUpdate {
    cohort: usize,
    noise_multiplier: f64,
    epsilon: f64,
}

fn epsilons(m: &SubsampledGaussian, delta: f64) -> Result<(f64, f64, f64), String> {
    let rdp = epsilon_rdp(m, delta).map_err(|e| e.to_string())?;
    let pld = match epsilon_pld(m, delta) {
        // The PLD grid of a tiny multiplier is too large; RDP still bounds.
        Err(AccountantError::PldTooLarge { .. }) => f64::INFINITY,
        other => other.map_err(|e| e.to_string())?,
    };
    Ok((rdp.epsilon, rdp.order, pld))
}

impl Setting {
    /// The full steps one device is charged over `rounds`.
    fn charged(&self, rounds: u64) -> Result<u64, String> {
        match self.max_participations {
            None => Ok(rounds),
            Some(0) => Err("--max-participations must be at least 1".into()),
            Some(_) if self.sampling_rate < 1.0 => Err(
                "--max-participations charges each device its rounds in full; it cannot be \
                 combined with a sampling rate below 1"
                    .into(),
            ),
            Some(k) => Ok(k.min(rounds)),
        }
    }

    fn placement(&self) -> &'static str {
        match self.placement {
            Placement::Server => "server",
            Placement::Client => "client",
        }
    }

    /// With client noise, one update against the coordinator over `rounds`.
    fn per_update(&self, z: f64, rounds: u64, delta: f64) -> Result<Option<PerUpdate>, String> {
        if self.placement == Placement::Server {
            return Ok(None);
        }
        let cohort = self
            .cohort
            .filter(|&m| m >= 1)
            .ok_or("--placement client needs --cohort m (devices per round, >= 1)")?;
        let per = z / (cohort as f64).sqrt();
        let m = SubsampledGaussian::new(1.0, per, rounds).map_err(|e| e.to_string())?;
        let (rdp, _, pld) = epsilons(&m, delta)?;
        Ok(Some(PerUpdate {
            cohort,
            noise_multiplier: per,
            epsilon: rdp.min(pld),
        }))
    }

    /// The sentences printed next to every ε.
    fn assumptions(&self, rounds: u64, per_update: Option<&PerUpdate>) -> Vec<String> {
        let mut out = vec![match (self.placement, per_update) {
            (Placement::Server, _) | (Placement::Client, None) => {
                "noise on the server, on the sum of updates the coordinator clipped again; the \
                 coordinator is trusted (it sees each update before the noise)"
                    .to_string()
            }
            (Placement::Client, Some(p)) => format!(
                "noise on the devices: the ε above holds only against those who see the model, \
                 and only if every device clips and adds its share; there is no secure \
                 aggregation, so the coordinator sees each update with noise multiplier z/√m = \
                 {:.4} (m = {}), ε = {:.4} against it",
                p.noise_multiplier, p.cohort, p.epsilon
            ),
        }];
        if let Some(k) = self.max_participations {
            out.push(format!(
                "participation limit: each device's update is in at most {} of the {rounds} \
                 rounds (the coordinator enforces the task's max_participations); its rounds are \
                 composed in full (no sampling amplification); it assumes which rounds a device \
                 joins does not depend on its data",
                k.min(rounds)
            ));
        } else if self.sampling_rate < 1.0 {
            out.push(format!(
                "sampling rate {}: this ε assumes Poisson sampling (each device independently \
                 with probability q), which the coordinator does not perform; it charges every \
                 round in full (q = 1)",
                self.sampling_rate
            ));
        } else {
            out.push(
                "no sampling amplification: each round composed in full (q = 1), T-fold \
                 composition"
                    .into(),
            );
        }
        out
    }
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
            let q = a.setting.sampling_rate;
            let charged = a.setting.charged(a.rounds)?;
            let m = SubsampledGaussian::new(q, a.noise_multiplier, charged)
                .map_err(|e| e.to_string())?;
            let (rdp, order, pld) = epsilons(&m, a.delta)?;
            let per_update = a.setting.per_update(a.noise_multiplier, charged, a.delta)?;
            let out = EpsilonOut {
                sampling_rate: q,
                noise_multiplier: a.noise_multiplier,
                rounds: a.rounds,
                charged_rounds: charged,
                delta: a.delta,
                epsilon_rdp: rdp,
                rdp_order: order,
                epsilon_pld: pld,
                placement: a.setting.placement(),
                assumptions: a.setting.assumptions(a.rounds, per_update.as_ref()),
                per_update,
            };
            if a.json {
                print_json(&out);
            } else {
                println!(
                    "{} rounds ({charged} charged per device), sampling rate {q}, noise \
                     multiplier {}, δ = {:e}",
                    a.rounds, a.noise_multiplier, a.delta
                );
                println!("  ε (RDP, order {order}) = {rdp:.4}");
                println!("  ε (PLD)              = {pld:.4}");
                println!("Both are upper bounds; the smaller one holds. Assuming:");
                for line in &out.assumptions {
                    println!("  - {line}");
                }
            }
        }
        PrivacyCommand::Noise(a) => {
            let method = match a.method {
                Method::Rdp => AccountingMethod::Rdp,
                Method::Pld => AccountingMethod::Pld,
            };
            let q = a.setting.sampling_rate;
            let charged = a.setting.charged(a.rounds)?;
            let z = noise_multiplier_for_epsilon(a.target_epsilon, a.delta, q, charged, method)
                .map_err(|e| e.to_string())?;
            let m = SubsampledGaussian::new(q, z, charged).map_err(|e| e.to_string())?;
            let (rdp, _, pld) = epsilons(&m, a.delta)?;
            let per_update = a.setting.per_update(z, charged, a.delta)?;
            let out = NoiseOut {
                target_epsilon: a.target_epsilon,
                sampling_rate: q,
                rounds: a.rounds,
                charged_rounds: charged,
                delta: a.delta,
                method: match a.method {
                    Method::Rdp => "rdp",
                    Method::Pld => "pld",
                },
                noise_multiplier: z,
                epsilon_rdp: rdp,
                epsilon_pld: pld,
                placement: a.setting.placement(),
                assumptions: a.setting.assumptions(a.rounds, per_update.as_ref()),
                per_update,
            };
            if a.json {
                print_json(&out);
            } else {
                println!(
                    "noise multiplier {z:.4} keeps {} rounds ({charged} charged per device) at \
                     sampling rate {q} within ε = {} (δ = {:e})",
                    a.rounds, a.target_epsilon, a.delta
                );
                println!("  with it: ε (RDP) = {rdp:.4}, ε (PLD) = {pld:.4}. Assuming:");
                for line in &out.assumptions {
                    println!("  - {line}");
                }
            }
        }
    }
    Ok(())
}
