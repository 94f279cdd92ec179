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
//! With a participation limit ([`PrivacyLedger::with_participation_limit`])
//! the ledger also keeps the worst device's view: the most rounds any one
//! device took part in so far, `k`, and the least noise multiplier of any
//! round, `σ_min`. That device's ε is at most that of `k` full Gaussian
//! steps at `σ_min`; every other device took part in at most `k` rounds,
//! each with at least that noise. Both views bound every device's ε, so the
//! ledger reports the smaller. The caller says how many rounds the worst
//! device has after each round ([`PrivacyLedger::record_round_for`]); a
//! check for a round yet to happen assumes that device takes part again, up
//! to the limit.
//!
//! Rounds of the Skellam mechanism on a securely aggregated integer sum
//! ([`PrivacyLedger::record_skellam_round`]) are charged by RDP alone
//! ([`skellam`](super::skellam)): the PLD accountant covers only the
//! Gaussian. Once the ledger holds a Skellam round, its ε is the RDP of the
//! Gaussian groups and the Skellam groups summed order by order, and
//! [`Spent::epsilon_pld`] is `+∞`. Under a participation limit the worst
//! device's `k` rounds are each charged the largest per-round RDP of any
//! recorded round, order by order: the full Gaussian step at the least
//! noise multiplier, or any recorded Skellam group's curve. Skellam curves
//! with different sensitivities cross, so no single recorded round bounds
//! the others at every order; the pointwise maximum over the groups does.
//!
//! The state (budget, groups, Skellam groups, PLD settings, worst device)
//! is `serde`-serialisable so the coordinator can persist it;
//! deserialisation re-validates every field. A state without Skellam
//! rounds is written exactly as before they existed, and a state written
//! then loads as a ledger without them.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::pld::{self, PldConfig};
use super::rdp::{self, RdpAccountant};
use super::skellam::Skellam;
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

/// `rounds` rounds of the Skellam mechanism with the same sensitivities and
/// noise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SkellamGroup {
    /// L1 sensitivity bound `Δ₁` of the integer sum.
    pub l1: f64,
    /// L2 sensitivity bound `Δ₂` of the integer sum.
    pub l2: f64,
    /// Mean `μ` of each Poisson of the total noise, per coordinate.
    pub mu: f64,
    /// Number of rounds, `>= 1`.
    pub rounds: u64,
}

impl SkellamGroup {
    /// The mechanism of each of these rounds.
    pub fn mechanism(&self) -> Skellam {
        Skellam {
            l1: self.l1,
            l2: self.l2,
            mu: self.mu,
        }
    }
}

/// The device that took part in the most rounds, under a participation
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorstDevice {
    /// The most rounds one device may take part in (`>= 1`).
    pub limit: u64,
    /// The most rounds any one device has taken part in so far (`<= limit`).
    pub participations: u64,
    /// The least noise multiplier of any recorded Gaussian round (`None`
    /// before the first; it stays `None` when every round was a Skellam
    /// round).
    pub least_noise: Option<f64>,
}

impl WorstDevice {
    /// This view after one more round at noise `sigma` after which the
    /// worst device has `participations` rounds.
    fn after(self, sigma: f64, participations: u64) -> Result<Self> {
        Ok(Self {
            least_noise: Some(self.least_noise.map_or(sigma, |z| z.min(sigma))),
            ..self.counted(participations)?
        })
    }

    /// This view after one more round (of any mechanism) after which the
    /// worst device has `participations` rounds.
    fn counted(self, participations: u64) -> Result<Self> {
        if participations > self.limit || participations < self.participations {
            return Err(AccountantError::InvalidParameter {
                name: "participations",
                value: participations as f64,
                allowed: "between the worst device's earlier count and the participation limit",
            });
        }
        Ok(Self {
            participations,
            ..self
        })
    }

    /// The worst device's rounds as one group: `k` full steps at `σ_min`.
    fn group(&self) -> Option<RoundGroup> {
        match (self.participations, self.least_noise) {
            (0, _) | (_, None) => None,
            (rounds, Some(noise_multiplier)) => Some(RoundGroup {
                sampling_rate: 1.0,
                noise_multiplier,
                rounds,
            }),
        }
    }
}

/// ε spent according to both accountants, at the ledger's δ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// RDP bound (Opacus-compatible).
    pub epsilon_rdp: f64,
    /// PLD bound (dp_accounting-compatible); `+∞` if the grid was too large
    /// or the ledger holds a Skellam round (which PLD does not cover).
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worst: Option<WorstDevice>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    skellam: Vec<SkellamGroup>,
    #[serde(skip)]
    spent_cache: OnceLock<Spent>,
}

impl PartialEq for PrivacyLedger {
    fn eq(&self, other: &Self) -> bool {
        self.budget == other.budget
            && self.groups == other.groups
            && self.pld_config == other.pld_config
            && self.worst == other.worst
            && self.skellam == other.skellam
    }
}

/// Unvalidated wire form of [`PrivacyLedger`].
#[derive(Deserialize)]
struct LedgerState {
    budget: PrivacyBudget,
    groups: Vec<RoundGroup>,
    #[serde(default)]
    pld_config: PldConfig,
    #[serde(default)]
    worst: Option<WorstDevice>,
    #[serde(default)]
    skellam: Vec<SkellamGroup>,
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
        for g in s.skellam {
            ledger.skellam = merged_skellam(&ledger.skellam, g.mechanism(), g.rounds)?;
        }
        if let Some(w) = s.worst {
            ledger = ledger.with_participation_limit(w.limit)?;
            if let Some(z) = w.least_noise {
                check_noise_multiplier(z)?;
                let fresh = ledger.worst.expect("just set");
                ledger.worst = Some(fresh.after(z, w.participations)?);
            } else if w.participations > 0 && ledger.skellam.is_empty() {
                return Err(AccountantError::InvalidParameter {
                    name: "least_noise",
                    value: f64::NAN,
                    allowed: "present once a device has taken part in a Gaussian round",
                });
            } else {
                let fresh = ledger.worst.expect("just set");
                ledger.worst = Some(fresh.counted(w.participations)?);
            }
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
            worst: None,
            skellam: Vec::new(),
            spent_cache: OnceLock::new(),
        })
    }

    /// Keeps the worst device's view too: no device takes part in more than
    /// `limit` rounds (the caller enforces it and reports the counts).
    pub fn with_participation_limit(mut self, limit: u64) -> Result<Self> {
        check_rounds(limit)?;
        self.worst = Some(WorstDevice {
            limit,
            participations: 0,
            least_noise: None,
        });
        self.spent_cache = OnceLock::new();
        Ok(self)
    }

    /// The worst device's view, under a participation limit.
    pub fn worst_device(&self) -> Option<WorstDevice> {
        self.worst
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

    /// The recorded groups of Skellam rounds.
    pub fn skellam_groups(&self) -> &[SkellamGroup] {
        &self.skellam
    }

    /// Total rounds recorded, Gaussian and Skellam (saturating at
    /// `u64::MAX`).
    pub fn rounds(&self) -> u64 {
        let gaussian = self.groups.iter().map(|g| g.rounds);
        let skellam = self.skellam.iter().map(|g| g.rounds);
        gaussian
            .chain(skellam)
            .fold(0u64, |acc, r| acc.saturating_add(r))
    }

    /// ε spent so far (RDP, PLD and the reported minimum).
    pub fn spent(&self) -> Result<Spent> {
        if let Some(s) = self.spent_cache.get() {
            return Ok(*s);
        }
        let s = self.evaluate(&self.groups, &self.skellam, self.worst.as_ref())?;
        Ok(*self.spent_cache.get_or_init(|| s))
    }

    /// Whether one more round at `(q, σ)` fits the budget; `BudgetExceeded`
    /// if not. Records nothing.
    pub fn check_round(&self, sampling_rate: f64, noise_multiplier: f64) -> Result<Projected> {
        self.check_rounds(sampling_rate, noise_multiplier, 1)
    }

    /// Whether `rounds` more rounds at `(q, σ)` fit the budget. Records
    /// nothing. Under a participation limit the worst device is assumed to
    /// take part in each of them, up to the limit.
    pub fn check_rounds(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        rounds: u64,
    ) -> Result<Projected> {
        let worst = self.projected_worst(noise_multiplier, rounds)?;
        self.project(sampling_rate, noise_multiplier, rounds, worst)
    }

    /// Whether one round at `(q, σ)` fits the budget when, after it, the
    /// device that took part most often has `participations` rounds.
    /// Records nothing. Without a participation limit, `check_round`.
    pub fn check_round_for(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        participations: u64,
    ) -> Result<Projected> {
        let worst = match self.worst {
            Some(w) => Some(w.after(noise_multiplier, participations)?),
            None => None,
        };
        self.project(sampling_rate, noise_multiplier, 1, worst)
    }

    /// Records one round at `(q, σ)` after which the device that took part
    /// most often has `participations` rounds, if it fits the budget;
    /// otherwise `BudgetExceeded` and the ledger is unchanged.
    pub fn record_round_for(
        &mut self,
        sampling_rate: f64,
        noise_multiplier: f64,
        participations: u64,
    ) -> Result<Projected> {
        let projected = self.check_round_for(sampling_rate, noise_multiplier, participations)?;
        self.groups = merged(&self.groups, sampling_rate, noise_multiplier, 1)?;
        if let Some(w) = self.worst {
            self.worst = Some(w.after(noise_multiplier, participations)?);
        }
        self.spent_cache = OnceLock::from(projected.would_be);
        Ok(projected)
    }

    fn projected_worst(&self, sigma: f64, rounds: u64) -> Result<Option<WorstDevice>> {
        match self.worst {
            Some(w) => {
                check_noise_multiplier(sigma)?;
                let k = w.participations.saturating_add(rounds).min(w.limit);
                Ok(Some(w.after(sigma, k)?))
            }
            None => Ok(None),
        }
    }

    fn project(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        rounds: u64,
        worst: Option<WorstDevice>,
    ) -> Result<Projected> {
        let next = merged(&self.groups, sampling_rate, noise_multiplier, rounds)?;
        self.project_state(&next, &self.skellam, worst)
    }

    /// Spent and projected ε when the ledger would hold `groups`, `skellam`
    /// and `worst`; `BudgetExceeded` if that is over the budget.
    fn project_state(
        &self,
        groups: &[RoundGroup],
        skellam: &[SkellamGroup],
        worst: Option<WorstDevice>,
    ) -> Result<Projected> {
        let spent = self.spent()?;
        let would_be = self.evaluate(groups, skellam, worst.as_ref())?;
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
        let worst = self.projected_worst(noise_multiplier, rounds)?;
        let projected = self.project(sampling_rate, noise_multiplier, rounds, worst)?;
        self.groups = merged(&self.groups, sampling_rate, noise_multiplier, rounds)?;
        self.worst = worst;
        self.spent_cache = OnceLock::from(projected.would_be);
        Ok(projected)
    }

    /// Whether one Skellam round `sk` fits the budget; `BudgetExceeded` if
    /// not. Records nothing. Under a participation limit the worst device
    /// is assumed to take part in it, up to the limit.
    pub fn check_skellam_round(&self, sk: Skellam) -> Result<Projected> {
        let worst = self.projected_worst_skellam()?;
        self.project_skellam(sk, worst)
    }

    /// Records one Skellam round `sk` if it fits the budget; otherwise
    /// `BudgetExceeded` and the ledger is unchanged.
    pub fn record_skellam_round(&mut self, sk: Skellam) -> Result<Projected> {
        let worst = self.projected_worst_skellam()?;
        self.commit_skellam(sk, worst)
    }

    /// Whether one Skellam round `sk` fits the budget when, after it, the
    /// device that took part most often has `participations` rounds.
    /// Records nothing. Without a participation limit,
    /// `check_skellam_round`.
    pub fn check_skellam_round_for(&self, sk: Skellam, participations: u64) -> Result<Projected> {
        let worst = self.worst.map(|w| w.counted(participations)).transpose()?;
        self.project_skellam(sk, worst)
    }

    /// Records one Skellam round `sk` after which the device that took part
    /// most often has `participations` rounds, if it fits the budget;
    /// otherwise `BudgetExceeded` and the ledger is unchanged.
    pub fn record_skellam_round_for(
        &mut self,
        sk: Skellam,
        participations: u64,
    ) -> Result<Projected> {
        let worst = self.worst.map(|w| w.counted(participations)).transpose()?;
        self.commit_skellam(sk, worst)
    }

    fn projected_worst_skellam(&self) -> Result<Option<WorstDevice>> {
        self.worst
            .map(|w| w.counted(w.participations.saturating_add(1).min(w.limit)))
            .transpose()
    }

    fn project_skellam(&self, sk: Skellam, worst: Option<WorstDevice>) -> Result<Projected> {
        let next = merged_skellam(&self.skellam, sk, 1)?;
        self.project_state(&self.groups, &next, worst)
    }

    fn commit_skellam(&mut self, sk: Skellam, worst: Option<WorstDevice>) -> Result<Projected> {
        let next = merged_skellam(&self.skellam, sk, 1)?;
        let projected = self.project_state(&self.groups, &next, worst)?;
        self.skellam = next;
        self.worst = worst;
        self.spent_cache = OnceLock::from(projected.would_be);
        Ok(projected)
    }

    /// ε of `groups` and `skellam` (every round charged), or of the worst
    /// device's rounds when that is smaller: both bound every device's
    /// loss. Under a participation limit the every-round view is bounded by
    /// RDP alone: its PLD over many rounds costs a large grid at every
    /// check, and it is the smaller view only when one round had far less
    /// noise than the others. With any Skellam round, both views are RDP
    /// alone.
    fn evaluate(
        &self,
        groups: &[RoundGroup],
        skellam: &[SkellamGroup],
        worst: Option<&WorstDevice>,
    ) -> Result<Spent> {
        if !skellam.is_empty() {
            return self.evaluate_with_skellam(groups, skellam, worst);
        }
        match (worst, worst.and_then(WorstDevice::group)) {
            (None, _) => self.evaluate_groups(groups),
            (Some(_), None) => Ok(Spent::ZERO),
            (Some(_), Some(g)) => {
                let one = self.evaluate_groups(&[g])?;
                let all_rdp = self.rdp_epsilon(groups)?;
                Ok(Spent {
                    epsilon_rdp: all_rdp.min(one.epsilon_rdp),
                    epsilon_pld: one.epsilon_pld,
                    epsilon: all_rdp.min(one.epsilon),
                })
            }
        }
    }

    /// RDP-only ε of Gaussian and Skellam rounds together; `epsilon_pld`
    /// is `+∞`. The worst device's `k` rounds are charged `k` times the
    /// largest per-round curve, order by order, of a full Gaussian step at
    /// the least noise multiplier of any Gaussian group (and of the worst
    /// device's record) and of every Skellam group.
    fn evaluate_with_skellam(
        &self,
        groups: &[RoundGroup],
        skellam: &[SkellamGroup],
        worst: Option<&WorstDevice>,
    ) -> Result<Spent> {
        let orders = rdp::default_orders();
        let mut all = vec![0.0; orders.len()];
        for g in groups {
            let curve = rdp::compute_rdp(g.sampling_rate, g.noise_multiplier, g.rounds, &orders)?;
            add_to(&mut all, &curve);
        }
        for g in skellam {
            let curve = super::skellam::compute_rdp_skellam(&g.mechanism(), g.rounds, &orders)?;
            add_to(&mut all, &curve);
        }
        let delta = self.budget.delta;
        let mut epsilon = rdp::epsilon_from_rdp(&orders, &all, delta)?.epsilon;
        if let Some(w) = worst {
            let k = w.participations;
            if k == 0 {
                return Ok(Spent::ZERO);
            }
            let mut per_round = vec![0.0f64; orders.len()];
            let least_noise = groups
                .iter()
                .map(|g| g.noise_multiplier)
                .chain(w.least_noise)
                .reduce(f64::min);
            if let Some(z) = least_noise {
                max_into(&mut per_round, &rdp::compute_rdp(1.0, z, 1, &orders)?);
            }
            for g in skellam {
                max_into(&mut per_round, &g.mechanism().rdp_curve(&orders)?);
            }
            let t = k as f64;
            let worst_curve: Vec<f64> = per_round.iter().map(|r| r * t).collect();
            let worst_eps = rdp::epsilon_from_rdp(&orders, &worst_curve, delta)?.epsilon;
            epsilon = epsilon.min(worst_eps);
        }
        Ok(Spent {
            epsilon_rdp: epsilon,
            epsilon_pld: f64::INFINITY,
            epsilon,
        })
    }

    fn rdp_epsilon(&self, groups: &[RoundGroup]) -> Result<f64> {
        let mut rdp = RdpAccountant::new();
        for g in groups {
            rdp.compose(g.sampling_rate, g.noise_multiplier, g.rounds)?;
        }
        Ok(rdp.epsilon(self.budget.delta)?.epsilon)
    }

    fn evaluate_groups(&self, groups: &[RoundGroup]) -> Result<Spent> {
        if groups.is_empty() {
            return Ok(Spent::ZERO);
        }
        let delta = self.budget.delta;
        let epsilon_rdp = self.rdp_epsilon(groups)?;
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

fn add_to(acc: &mut [f64], curve: &[f64]) {
    for (a, c) in acc.iter_mut().zip(curve) {
        *a += c;
    }
}

fn max_into(acc: &mut [f64], curve: &[f64]) {
    for (a, c) in acc.iter_mut().zip(curve) {
        *a = a.max(*c);
    }
}

/// `groups` plus `rounds` Skellam rounds of `sk`, merged into an existing
/// group with bit-identical parameters when there is one.
fn merged_skellam(groups: &[SkellamGroup], sk: Skellam, rounds: u64) -> Result<Vec<SkellamGroup>> {
    sk.validate()?;
    check_rounds(rounds)?;
    let mut out = groups.to_vec();
    let same = |g: &SkellamGroup| {
        g.l1.to_bits() == sk.l1.to_bits()
            && g.l2.to_bits() == sk.l2.to_bits()
            && g.mu.to_bits() == sk.mu.to_bits()
    };
    match out.iter_mut().find(|g| same(g)) {
        Some(g) => g.rounds = added_rounds(g.rounds, rounds)?,
        None => out.push(SkellamGroup {
            l1: sk.l1,
            l2: sk.l2,
            mu: sk.mu,
            rounds,
        }),
    }
    Ok(out)
}

/// `total + rounds`, or an error when it does not fit in `u64`.
fn added_rounds(total: u64, rounds: u64) -> Result<u64> {
    total
        .checked_add(rounds)
        .ok_or(AccountantError::InvalidParameter {
            name: "rounds",
            value: rounds as f64,
            allowed: "such that the total number of rounds fits in u64",
        })
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
        Some(g) => g.rounds = added_rounds(g.rounds, rounds)?,
        None => out.push(RoundGroup {
            sampling_rate: q,
            noise_multiplier: sigma,
            rounds,
        }),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_round(rounds: &[f64]) -> Spent {
        let mut l = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
        for z in rounds {
            l.record_round(1.0, *z).unwrap();
        }
        l.spent().unwrap()
    }

    fn limited(limit: u64) -> PrivacyLedger {
        PrivacyLedger::new(f64::MAX, 1e-5)
            .unwrap()
            .with_participation_limit(limit)
            .unwrap()
    }

    #[test]
    fn the_worst_device_is_charged_its_own_rounds() {
        let mut l = limited(3);
        for (round, k) in [1, 2, 3, 3, 3, 3].into_iter().enumerate() {
            l.record_round_for(1.0, 1.0, k).unwrap();
            assert_eq!(l.rounds(), round as u64 + 1);
        }
        let w = l.worst_device().unwrap();
        assert_eq!(
            (w.limit, w.participations, w.least_noise),
            (3, 3, Some(1.0))
        );
        // Six rounds, but no device in more than three: the ε of three.
        let three = every_round(&[1.0; 3]);
        assert_eq!(l.spent().unwrap(), three);
        assert!(three.epsilon < every_round(&[1.0; 6]).epsilon);
    }

    #[test]
    fn the_worst_device_gets_the_least_noise_of_any_round() {
        let mut l = limited(10);
        for (z, k) in [(1.0, 1), (0.9, 2), (1.0, 2), (1.0, 2)] {
            l.record_round_for(1.0, z, k).unwrap();
        }
        // Its rounds are not known one by one: two rounds at 0.9 bound it,
        // below the four rounds in full.
        let want = every_round(&[0.9, 0.9]);
        assert!(want.epsilon < every_round(&[1.0, 0.9, 1.0, 1.0]).epsilon);
        assert_eq!(l.spent().unwrap(), want);
    }

    #[test]
    fn every_round_in_full_is_kept_when_it_is_the_smaller_bound() {
        // One round with little noise, then many with a lot: charging the
        // worst device all its rounds at the least noise is looser than
        // composing the rounds as they were.
        let zs = [0.7, 8.0, 8.0, 8.0, 8.0];
        let mut l = limited(5);
        for (i, z) in zs.iter().enumerate() {
            l.record_round_for(1.0, *z, i as u64 + 1).unwrap();
        }
        // Under a limit the every-round view is bounded by RDP.
        let all = every_round(&zs);
        assert!(all.epsilon_rdp < every_round(&[0.7; 5]).epsilon);
        assert_eq!(l.spent().unwrap().epsilon, all.epsilon_rdp);
    }

    #[test]
    fn checks_assume_the_worst_device_joins_again_up_to_the_limit() {
        let mut l = limited(2);
        let one = l.check_round(1.0, 1.0).unwrap().would_be;
        assert_eq!(one, every_round(&[1.0]));
        l.record_round_for(1.0, 1.0, 1).unwrap();
        l.record_round_for(1.0, 1.0, 2).unwrap();
        // At the limit, another round at the same noise charges nothing more.
        let p = l.check_round(1.0, 1.0).unwrap();
        assert_eq!(p.would_be, p.spent);
        // Less noise still costs: the bound takes the least noise.
        let p = l.check_round(1.0, 0.5).unwrap();
        assert!(p.would_be.epsilon > p.spent.epsilon);
        // A budget between the two refuses only the noisier-bound round.
        let mut tight = PrivacyLedger::new(p.spent.epsilon * 1.01, 1e-5)
            .unwrap()
            .with_participation_limit(2)
            .unwrap();
        tight.record_round_for(1.0, 1.0, 2).unwrap();
        tight.check_round(1.0, 1.0).unwrap();
        assert!(matches!(
            tight.record_round_for(1.0, 0.5, 2),
            Err(AccountantError::BudgetExceeded { .. })
        ));
        assert_eq!(tight.rounds(), 1, "a refused round is not recorded");
    }

    #[test]
    fn counts_beyond_the_limit_or_going_back_are_refused() {
        let mut l = limited(2);
        l.record_round_for(1.0, 1.0, 2).unwrap();
        for k in [3, 1] {
            let e = l.record_round_for(1.0, 1.0, k).unwrap_err();
            assert!(
                matches!(
                    e,
                    AccountantError::InvalidParameter {
                        name: "participations",
                        ..
                    }
                ),
                "{k}: {e}"
            );
        }
        assert_eq!(l.rounds(), 1);
        assert!(
            PrivacyLedger::new(1.0, 1e-5)
                .unwrap()
                .with_participation_limit(0)
                .is_err()
        );
    }

    #[test]
    fn the_worst_device_survives_storage_and_is_validated() {
        let mut l = limited(4);
        l.record_round_for(1.0, 1.3, 1).unwrap();
        l.record_round_for(1.0, 1.1, 2).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.spent().unwrap(), l.spent().unwrap());
        // A ledger stored before the field existed charges every round.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("worst");
        let old: PrivacyLedger = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(old.worst_device(), None);
        assert_eq!(old.spent().unwrap(), every_round(&[1.3, 1.1]));
        // Counts past the limit, or a count with no noise, do not load.
        for worst in [
            serde_json::json!({"limit": 4, "participations": 5, "least_noise": 1.0}),
            serde_json::json!({"limit": 4, "participations": 1, "least_noise": null}),
            serde_json::json!({"limit": 4, "participations": 1, "least_noise": -1.0}),
            serde_json::json!({"limit": 0, "participations": 0, "least_noise": null}),
        ] {
            v["worst"] = worst.clone();
            assert!(
                serde_json::from_value::<PrivacyLedger>(v.clone()).is_err(),
                "{worst}"
            );
        }
    }

    // Skellam rounds.

    /// A state written before Skellam rounds existed: three rounds at
    /// σ = 1.5 and one at σ = 2, and the ε it reported then.
    const OLD_STATE: &str = r#"{"budget":{"epsilon":8.0,"delta":0.00001},"groups":[{"sampling_rate":1.0,"noise_multiplier":1.5,"rounds":3},{"sampling_rate":1.0,"noise_multiplier":2.0,"rounds":1}],"pld_config":{"value_discretization_interval":0.0001,"log_mass_truncation_bound":-50.0,"tail_mass_truncation":1e-15}}"#;
    const OLD_SPENT: Spent = Spent {
        epsilon_rdp: 6.170674531265676,
        epsilon_pld: 5.724059242991937,
        epsilon: 5.724059242991937,
    };
    /// The same under a participation limit of 3: rounds at σ = 1.5 and
    /// σ = 2 after which the worst device had 1 and 2 rounds.
    const OLD_LIMITED_STATE: &str = r#"{"budget":{"epsilon":8.0,"delta":0.00001},"groups":[{"sampling_rate":1.0,"noise_multiplier":1.5,"rounds":1},{"sampling_rate":1.0,"noise_multiplier":2.0,"rounds":1}],"pld_config":{"value_discretization_interval":0.0001,"log_mass_truncation_bound":-50.0,"tail_mass_truncation":1e-15},"worst":{"limit":3,"participations":2,"least_noise":1.5}}"#;
    const OLD_LIMITED_SPENT: Spent = Spent {
        epsilon_rdp: 3.839633759155446,
        epsilon_pld: 4.0892342939193105,
        epsilon: 3.839633759155446,
    };

    fn sk(l1: f64, l2: f64, mu: f64) -> Skellam {
        Skellam::new(l1, l2, mu).unwrap()
    }

    /// The Skellam bound written out (Agarwal et al. 2021, with `μ` the
    /// mean of each Poisson), `rounds` times, at `⌈α⌉` on the default
    /// orders.
    fn skellam_curve(s: Skellam, rounds: f64) -> Vec<f64> {
        let (l1, l2, mu) = (s.l1, s.l2, s.mu);
        rdp::default_orders()
            .iter()
            .map(|&a| {
                let a = a.ceil();
                let second = ((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (16.0 * mu * mu);
                rounds * (a * l2 * l2 / (4.0 * mu) + second.min(3.0 * l1 / (4.0 * mu)))
            })
            .collect()
    }

    /// `rounds` full Gaussian steps at `σ`, written out.
    fn gaussian_curve(sigma: f64, rounds: f64) -> Vec<f64> {
        rdp::default_orders()
            .iter()
            .map(|&a| rounds * a / (2.0 * sigma * sigma))
            .collect()
    }

    fn sum(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// ε at `delta` of a curve on the default orders, with the conversion
    /// of Balle et al. 2020 written out.
    fn eps_of(curve: &[f64], delta: f64) -> f64 {
        rdp::default_orders()
            .iter()
            .zip(curve)
            .map(|(&a, &r)| r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln())
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }

    fn assert_close(got: f64, want: f64) {
        assert!((got - want).abs() <= 1e-12 * want.abs(), "{got} vs {want}");
    }

    #[test]
    fn skellam_only_ledger_charges_the_summed_rdp() {
        let (a, b) = (sk(40.0, 6.0, 2000.0), sk(60.0, 8.0, 3000.0));
        let mut l = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
        for s in [a, b, a, a, b] {
            l.record_skellam_round(s).unwrap();
        }
        assert_eq!(l.rounds(), 5);
        assert!(l.groups().is_empty());
        let g = l.skellam_groups();
        assert_eq!(g.len(), 2, "identical rounds are grouped");
        assert_eq!((g[0].mechanism(), g[0].rounds), (a, 3));
        assert_eq!((g[1].mechanism(), g[1].rounds), (b, 2));
        let want = eps_of(&sum(&skellam_curve(a, 3.0), &skellam_curve(b, 2.0)), 1e-5);
        let spent = l.spent().unwrap();
        assert_close(spent.epsilon, want);
        assert_eq!(spent.epsilon_rdp, spent.epsilon);
        assert_eq!(spent.epsilon_pld, f64::INFINITY);
        // The cached value is the one a fresh evaluation gives.
        let fresh: PrivacyLedger =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(fresh.spent().unwrap(), spent);
    }

    #[test]
    fn skellam_and_gaussian_rounds_compose_by_rdp() {
        let d = 1e-5;
        let s = sk(40.0, 6.0, 2000.0);
        let mut l = PrivacyLedger::new(f64::MAX, d).unwrap();
        l.record_rounds(0.05, 1.0, 40).unwrap();
        l.record_skellam_round(s).unwrap();
        l.record_round(1.0, 3.0).unwrap();
        assert_eq!(l.rounds(), 42);
        let orders = rdp::default_orders();
        let subsampled = rdp::compute_rdp(0.05, 1.0, 40, &orders).unwrap();
        let want = sum(
            &sum(&subsampled, &gaussian_curve(3.0, 1.0)),
            &skellam_curve(s, 1.0),
        );
        let spent = l.spent().unwrap();
        assert_close(spent.epsilon, eps_of(&want, d));
        assert_eq!(spent.epsilon_pld, f64::INFINITY);
        // More than the Gaussian rounds or the Skellam round alone.
        let gaussian_only = eps_of(&sum(&subsampled, &gaussian_curve(3.0, 1.0)), d);
        assert!(spent.epsilon > gaussian_only);
        assert!(spent.epsilon > eps_of(&skellam_curve(s, 1.0), d));
    }

    #[test]
    fn skellam_rounds_turn_the_pld_bound_off() {
        // Many subsampled rounds: there PLD is well below RDP and is the
        // reported ε.
        let mut gaussian = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
        gaussian.record_rounds(0.01, 1.0, 500).unwrap();
        let g = gaussian.spent().unwrap();
        assert!(g.epsilon_pld < 0.95 * g.epsilon_rdp, "{g:?}");
        assert_eq!(g.epsilon, g.epsilon_pld);
        // One Skellam round that costs next to nothing: the ledger now
        // reports the RDP bound, which PLD would undercut.
        let mut mixed = gaussian.clone();
        let p = mixed.record_skellam_round(sk(1.0, 1.0, 1e12)).unwrap();
        let m = mixed.spent().unwrap();
        assert_eq!(p.spent, g);
        assert_eq!(p.would_be, m);
        assert_eq!(m.epsilon_pld, f64::INFINITY);
        assert!(m.epsilon >= g.epsilon_rdp, "{m:?} vs {g:?}");
        assert!(m.epsilon <= g.epsilon_rdp * (1.0 + 1e-6), "{m:?} vs {g:?}");
        // Later Gaussian rounds stay on RDP alone.
        mixed.record_rounds(0.01, 1.0, 10).unwrap();
        assert_eq!(mixed.spent().unwrap().epsilon_pld, f64::INFINITY);
    }

    #[test]
    fn skellam_ledger_survives_storage_and_old_states_load() {
        let mut l = PrivacyLedger::new(8.0, 1e-5).unwrap();
        l.record_rounds(1.0, 3.0, 2).unwrap();
        l.record_skellam_round(sk(40.0, 6.0, 2000.0)).unwrap();
        l.record_skellam_round(sk(40.0, 6.0, 2000.0)).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains(r#""skellam":[{"l1":40.0,"l2":6.0,"mu":2000.0,"rounds":2}]"#));
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.spent().unwrap(), l.spent().unwrap());

        // A ledger without Skellam rounds is written as before, and a state
        // written before they existed loads and reports the same ε.
        let mut g = PrivacyLedger::new(8.0, 1e-5).unwrap();
        g.record_rounds(1.0, 1.5, 3).unwrap();
        g.record_round(1.0, 2.0).unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), OLD_STATE);
        let old: PrivacyLedger = serde_json::from_str(OLD_STATE).unwrap();
        assert_eq!(old, g);
        assert!(old.skellam_groups().is_empty());
        assert_eq!(old.spent().unwrap(), OLD_SPENT);
        assert_eq!(g.spent().unwrap(), OLD_SPENT);
        let old: PrivacyLedger = serde_json::from_str(OLD_LIMITED_STATE).unwrap();
        assert_eq!(old.spent().unwrap(), OLD_LIMITED_SPENT);
        let mut w = PrivacyLedger::new(8.0, 1e-5)
            .unwrap()
            .with_participation_limit(3)
            .unwrap();
        w.record_round_for(1.0, 1.5, 1).unwrap();
        w.record_round_for(1.0, 2.0, 2).unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), OLD_LIMITED_STATE);

        // Invalid Skellam groups do not load.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for bad in [
            serde_json::json!([{"l1": 40.0, "l2": 6.0, "mu": -1.0, "rounds": 1}]),
            serde_json::json!([{"l1": 40.0, "l2": 6.0, "mu": 0.0, "rounds": 1}]),
            serde_json::json!([{"l1": 4.0, "l2": 6.0, "mu": 2000.0, "rounds": 1}]),
            serde_json::json!([{"l1": 40.0, "l2": 0.0, "mu": 2000.0, "rounds": 1}]),
            serde_json::json!([{"l1": 40.0, "l2": 6.0, "mu": 2000.0, "rounds": 0}]),
            serde_json::json!([{"l1": null, "l2": 6.0, "mu": 2000.0, "rounds": 1}]),
            serde_json::json!([{"l1": 40.0, "l2": 6.0, "rounds": 1}]),
            serde_json::json!({"l1": 40.0, "l2": 6.0, "mu": 2000.0, "rounds": 1}),
        ] {
            let mut v = v.clone();
            v["skellam"] = bad.clone();
            assert!(serde_json::from_value::<PrivacyLedger>(v).is_err(), "{bad}");
        }
        // Stored groups that repeat parameters are merged on load.
        let mut v = v;
        let group = serde_json::json!({"l1": 40.0, "l2": 6.0, "mu": 2000.0, "rounds": 1});
        v["skellam"] = serde_json::json!([group.clone(), group]);
        let merged: PrivacyLedger = serde_json::from_value(v).unwrap();
        assert_eq!(merged, l);
    }

    #[test]
    fn skellam_rounds_over_the_budget_are_refused() {
        let (s, d) = (sk(40.0, 6.0, 2000.0), 1e-5);
        let eps4 = eps_of(&skellam_curve(s, 4.0), d);
        let mut l = PrivacyLedger::new(eps4 * 1.0005, d).unwrap();
        for _ in 0..4 {
            l.record_skellam_round(s).unwrap();
        }
        assert_close(l.spent().unwrap().epsilon, eps4);
        let before = l.clone();
        for refused in [l.check_skellam_round(s), l.record_skellam_round(s)] {
            match refused {
                Err(AccountantError::BudgetExceeded {
                    spent,
                    would_be,
                    budget,
                }) => {
                    assert_close(spent, eps4);
                    assert!(would_be > budget && budget == eps4 * 1.0005);
                }
                other => panic!("expected BudgetExceeded, got {other:?}"),
            }
        }
        assert_eq!(l, before, "a refused round is not recorded");
        assert!(matches!(
            l.record_round(1.0, 1.0),
            Err(AccountantError::BudgetExceeded { .. })
        ));
        assert_eq!(l, before);
        // A much noisier round still fits.
        let p = l.record_skellam_round(sk(40.0, 6.0, 1e9)).unwrap();
        assert!(p.remaining >= 0.0 && p.would_be.epsilon > p.spent.epsilon);
        assert_eq!(l.rounds(), 5);
        // Bad parameters are errors, not refusals.
        for bad in [sk(40.0, 6.0, 1.0), sk(1.0, 1.0, 1.0)].map(|s| Skellam { mu: -s.mu, ..s }) {
            assert!(matches!(
                l.check_skellam_round(bad),
                Err(AccountantError::InvalidParameter { name: "mu", .. })
            ));
        }
    }

    #[test]
    fn skellam_worst_device_is_charged_its_own_rounds() {
        let s = sk(40.0, 6.0, 2000.0);
        let mut l = limited(3);
        // Before any round, a check assumes the worst device joins.
        assert_close(
            l.check_skellam_round(s).unwrap().would_be.epsilon,
            eps_of(&skellam_curve(s, 1.0), 1e-5),
        );
        for (round, k) in [1, 2, 3, 3, 3, 3].into_iter().enumerate() {
            l.record_skellam_round_for(s, k).unwrap();
            assert_eq!(l.rounds(), round as u64 + 1);
        }
        let w = l.worst_device().unwrap();
        assert_eq!((w.limit, w.participations, w.least_noise), (3, 3, None));
        // Six rounds, no device in more than three: the ε of three.
        let three = eps_of(&skellam_curve(s, 3.0), 1e-5);
        assert_close(l.spent().unwrap().epsilon, three);
        assert!(three < eps_of(&skellam_curve(s, 6.0), 1e-5));
        // At the limit another such round costs nothing more.
        let p = l.check_skellam_round(s).unwrap();
        assert_eq!(p.would_be, p.spent);
        // Counts past the limit or going back are refused.
        for k in [4, 2] {
            assert!(matches!(
                l.record_skellam_round_for(s, k),
                Err(AccountantError::InvalidParameter {
                    name: "participations",
                    ..
                })
            ));
        }
        assert_eq!(l.rounds(), 6);
        // Stored with no Gaussian noise on record, and loaded back.
        let back: PrivacyLedger =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.spent().unwrap(), l.spent().unwrap());
    }

    #[test]
    fn skellam_worst_device_takes_the_largest_curve_at_every_order() {
        // a: flat (a large L1 term), b: steep (more L2 per unit of noise).
        // Their curves cross, so neither bounds the other's rounds.
        let (a, b) = (sk(11_000.0, 1.0, 200.0), sk(3.0, 3.0, 600.0));
        let (ca, cb) = (skellam_curve(a, 2.0), skellam_curve(b, 2.0));
        assert!(ca.iter().zip(&cb).any(|(x, y)| x > y));
        assert!(ca.iter().zip(&cb).any(|(x, y)| x < y));
        let envelope: Vec<f64> = ca.iter().zip(&cb).map(|(x, y)| x.max(*y)).collect();
        let want = eps_of(&envelope, 1e-5);
        assert!(want > 1.01 * eps_of(&ca, 1e-5).max(eps_of(&cb, 1e-5)));

        // Six rounds, no device in more than two.
        let mut l = limited(10);
        for (s, k) in [(a, 1), (b, 2), (a, 2), (b, 2), (a, 2), (b, 2)] {
            l.record_skellam_round_for(s, k).unwrap();
        }
        let spent = l.spent().unwrap();
        assert_close(spent.epsilon, want);
        assert_eq!(spent.epsilon_pld, f64::INFINITY);

        // With Gaussian rounds too, the full step at the least noise joins
        // the maximum.
        let sigma = 9.0;
        let mut l = limited(10);
        for (round, k) in [1, 2, 2, 2, 2, 2, 2, 2].into_iter().enumerate() {
            match round % 4 {
                0 => l.record_skellam_round_for(a, k),
                1 => l.record_skellam_round_for(b, k),
                2 => l.record_round_for(1.0, sigma, k),
                _ => l.record_round_for(1.0, 2.0 * sigma, k),
            }
            .unwrap();
        }
        let gauss = gaussian_curve(sigma, 2.0);
        let envelope: Vec<f64> = envelope
            .iter()
            .zip(&gauss)
            .map(|(x, y)| x.max(*y))
            .collect();
        assert!(envelope.iter().zip(&gauss).any(|(x, y)| x == y));
        let spent = l.spent().unwrap();
        assert_close(spent.epsilon, eps_of(&envelope, 1e-5));
        assert_eq!(l.worst_device().unwrap().least_noise, Some(sigma));
    }
}
