//! Per-task privacy ledger: a configured `(ε_max, δ)` budget and the rounds
//! run so far, grouped by their `(q, σ)` parameters.
//!
//! Rounds may change `q` and `σ`. The RDP accountant composes heterogeneous
//! rounds by summing per-order RDP; the PLD accountant self-composes each
//! distinct `(q, σ)` group and convolves the groups. Both give valid upper
//! bounds on ε, so the ledger reports and enforces the smaller of the two.
//! If a PLD grid would exceed [`pld::MAX_GRID_POINTS`] (only for very small
//! noise), the PLD bound is taken as `+∞` and the RDP bound is used alone.
//!
//! The state (budget, groups, PLD settings) is `serde`-serialisable so the
//! coordinator can persist it; deserialisation re-validates every field.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::pld::{self, PldConfig};
use super::rdp::RdpAccountant;
use super::{AccountantError, Result, check_delta, check_epsilon};
use super::{check_noise_multiplier, check_rounds, check_sampling_rate};

/// The `(ε, δ)` budget of a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyBudget {
    /// Largest ε the task may spend (finite, `> 0`).
    pub epsilon: f64,
    /// The δ at which ε is measured, in `(0, 1)`.
    pub delta: f64,
}

/// `rounds` rounds run with the same sampling rate and noise multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundGroup {
    /// Sampling rate `q` in `(0, 1]`.
    pub sampling_rate: f64,
    /// Noise multiplier `σ > 0`.
    pub noise_multiplier: f64,
    /// Number of rounds, `>= 1`.
    pub rounds: u64,
}

/// ε spent according to both accountants, at the ledger's δ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// RDP bound (Opacus-compatible).
    pub epsilon_rdp: f64,
    /// PLD bound (dp_accounting-compatible); `+∞` if the grid was too large.
    pub epsilon_pld: f64,
    /// The reported ε: `min(epsilon_rdp, epsilon_pld)`.
    pub epsilon: f64,
}

impl Spent {
    const ZERO: Self = Self {
        epsilon_rdp: 0.0,
        epsilon_pld: 0.0,
        epsilon: 0.0,
    };
}

/// Outcome of an accepted (or acceptable) round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Projected {
    /// ε before the round(s).
    pub spent: Spent,
    /// ε after the round(s).
    pub would_be: Spent,
    /// Budget ε left after the round(s).
    pub remaining: f64,
}

/// Per-task ledger of privacy spending.
///
/// The ε spent so far is cached (not serialised), so a check costs one
/// accountant evaluation (of the projected state).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "LedgerState")]
pub struct PrivacyLedger {
    budget: PrivacyBudget,
    groups: Vec<RoundGroup>,
    pld_config: PldConfig,
    #[serde(skip)]
    spent_cache: OnceLock<Spent>,
}

impl PartialEq for PrivacyLedger {
    fn eq(&self, other: &Self) -> bool {
        self.budget == other.budget
            && self.groups == other.groups
            && self.pld_config == other.pld_config
    }
}

/// Unvalidated wire form of [`PrivacyLedger`].
#[derive(Deserialize)]
struct LedgerState {
    budget: PrivacyBudget,
    groups: Vec<RoundGroup>,
    #[serde(default)]
    pld_config: PldConfig,
}

impl TryFrom<LedgerState> for PrivacyLedger {
    type Error = AccountantError;

    fn try_from(s: LedgerState) -> Result<Self> {
        let mut ledger =
            Self::new(s.budget.epsilon, s.budget.delta)?.with_pld_config(s.pld_config)?;
        for g in s.groups {
            ledger.groups = merged(
                &ledger.groups,
                g.sampling_rate,
                g.noise_multiplier,
                g.rounds,
            )?;
        }
        Ok(ledger)
    }
}

impl PrivacyLedger {
    /// An empty ledger with budget `(epsilon, delta)` and default PLD settings.
    pub fn new(epsilon: f64, delta: f64) -> Result<Self> {
        check_epsilon(epsilon, "budget epsilon")?;
        check_delta(delta)?;
        Ok(Self {
            budget: PrivacyBudget { epsilon, delta },
            groups: Vec::new(),
            pld_config: PldConfig::default(),
            spent_cache: OnceLock::new(),
        })
    }

    /// Replaces the PLD settings.
    pub fn with_pld_config(mut self, config: PldConfig) -> Result<Self> {
        config.validate()?;
        self.pld_config = config;
        self.spent_cache = OnceLock::new();
        Ok(self)
    }

    /// The budget.
    pub fn budget(&self) -> PrivacyBudget {
        self.budget
    }

    /// The recorded groups of rounds.
    pub fn groups(&self) -> &[RoundGroup] {
        &self.groups
    }

    /// Total rounds recorded (saturating at `u64::MAX`).
    pub fn rounds(&self) -> u64 {
        self.groups
            .iter()
            .fold(0u64, |acc, g| acc.saturating_add(g.rounds))
    }

    /// ε spent so far (RDP, PLD and the reported minimum).
    pub fn spent(&self) -> Result<Spent> {
        if let Some(s) = self.spent_cache.get() {
            return Ok(*s);
        }
        let s = self.evaluate(&self.groups)?;
        Ok(*self.spent_cache.get_or_init(|| s))
    }

    /// Whether one more round at `(q, σ)` fits the budget; `BudgetExceeded`
    /// if not. Records nothing.
    pub fn check_round(&self, sampling_rate: f64, noise_multiplier: f64) -> Result<Projected> {
        self.check_rounds(sampling_rate, noise_multiplier, 1)
    }

    /// Whether `rounds` more rounds at `(q, σ)` fit the budget. Records nothing.
    pub fn check_rounds(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        rounds: u64,
    ) -> Result<Projected> {
        let next = merged(&self.groups, sampling_rate, noise_multiplier, rounds)?;
        let spent = self.spent()?;
        let would_be = self.evaluate(&next)?;
        if would_be.epsilon > self.budget.epsilon {
            return Err(AccountantError::BudgetExceeded {
                spent: spent.epsilon,
                would_be: would_be.epsilon,
                budget: self.budget.epsilon,
            });
        }
        Ok(Projected {
            spent,
            would_be,
            remaining: self.budget.epsilon - would_be.epsilon,
        })
    }

    /// Records one round at `(q, σ)` if it fits the budget; otherwise returns
    /// `BudgetExceeded` and leaves the ledger unchanged.
    pub fn record_round(&mut self, sampling_rate: f64, noise_multiplier: f64) -> Result<Projected> {
        self.record_rounds(sampling_rate, noise_multiplier, 1)
    }

    /// Records `rounds` rounds at `(q, σ)` if they fit the budget.
    pub fn record_rounds(
        &mut self,
        sampling_rate: f64,
        noise_multiplier: f64,
        rounds: u64,
    ) -> Result<Projected> {
        let projected = self.check_rounds(sampling_rate, noise_multiplier, rounds)?;
        self.groups = merged(&self.groups, sampling_rate, noise_multiplier, rounds)?;
        self.spent_cache = OnceLock::from(projected.would_be);
        Ok(projected)
    }

    fn evaluate(&self, groups: &[RoundGroup]) -> Result<Spent> {
        if groups.is_empty() {
            return Ok(Spent::ZERO);
        }
        let delta = self.budget.delta;
        let mut rdp = RdpAccountant::new();
        for g in groups {
            rdp.compose(g.sampling_rate, g.noise_multiplier, g.rounds)?;
        }
        let epsilon_rdp = rdp.epsilon(delta)?.epsilon;
        let triples: Vec<(f64, f64, u64)> = groups
            .iter()
            .map(|g| (g.sampling_rate, g.noise_multiplier, g.rounds))
            .collect();
        let epsilon_pld = match pld::pld_for_groups(&triples, &self.pld_config) {
            Ok(p) => p.epsilon_for_delta(delta),
            Err(AccountantError::PldTooLarge { .. }) => f64::INFINITY,
            Err(e) => return Err(e),
        };
        Ok(Spent {
            epsilon_rdp,
            epsilon_pld,
            epsilon: epsilon_rdp.min(epsilon_pld),
        })
    }
}

/// `groups` plus `rounds` rounds at `(q, σ)`, merged into an existing group
/// with bit-identical parameters when there is one.
fn merged(groups: &[RoundGroup], q: f64, sigma: f64, rounds: u64) -> Result<Vec<RoundGroup>> {
    check_sampling_rate(q)?;
    check_noise_multiplier(sigma)?;
    check_rounds(rounds)?;
    let mut out = groups.to_vec();
    match out.iter_mut().find(|g| {
        g.sampling_rate.to_bits() == q.to_bits() && g.noise_multiplier.to_bits() == sigma.to_bits()
    }) {
        Some(g) => {
            g.rounds = g
                .rounds
                .checked_add(rounds)
                .ok_or(AccountantError::InvalidParameter {
                    name: "rounds",
                    value: rounds as f64,
                    allowed: "such that the total number of rounds fits in u64",
                })?;
        }
        None => out.push(RoundGroup {
            sampling_rate: q,
            noise_multiplier: sigma,
            rounds,
        }),
    }
    Ok(out)
}
