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
//! The state (budget, groups, PLD settings, worst device) is
//! `serde`-serialisable so the coordinator can persist it; deserialisation
//! re-validates every field.

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

/// The device that took part in the most rounds, under a participation
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorstDevice {
    /// The most rounds one device may take part in (`>= 1`).
    pub limit: u64,
    /// The most rounds any one device has taken part in so far (`<= limit`).
    pub participations: u64,
    /// The least noise multiplier of any recorded round (`None` before the
    /// first).
    pub least_noise: Option<f64>,
}

impl WorstDevice {
    /// This view after one more round at noise `sigma` after which the
    /// worst device has `participations` rounds.
    fn after(self, sigma: f64, participations: u64) -> Result<Self> {
        if participations > self.limit || participations < self.participations {
            return Err(AccountantError::InvalidParameter {
                name: "participations",
                value: participations as f64,
                allowed: "between the worst device's earlier count and the participation limit",
            });
        }
        Ok(Self {
            limit: self.limit,
            participations,
            least_noise: Some(self.least_noise.map_or(sigma, |z| z.min(sigma))),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worst: Option<WorstDevice>,
    #[serde(skip)]
    spent_cache: OnceLock<Spent>,
}

impl PartialEq for PrivacyLedger {
    fn eq(&self, other: &Self) -> bool {
        self.budget == other.budget
            && self.groups == other.groups
            && self.pld_config == other.pld_config
            && self.worst == other.worst
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
        if let Some(w) = s.worst {
            ledger = ledger.with_participation_limit(w.limit)?;
            if let Some(z) = w.least_noise {
                check_noise_multiplier(z)?;
                let fresh = ledger.worst.expect("just set");
                ledger.worst = Some(fresh.after(z, w.participations)?);
            } else if w.participations > 0 {
                return Err(AccountantError::InvalidParameter {
                    name: "least_noise",
                    value: f64::NAN,
                    allowed: "present once a device has taken part",
                });
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
        let s = self.evaluate(&self.groups, self.worst.as_ref())?;
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
        let spent = self.spent()?;
        let would_be = self.evaluate(&next, worst.as_ref())?;
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

    /// ε of `groups` (every round charged), or of the worst device's rounds
    /// when that is smaller: both bound every device's loss. Under a
    /// participation limit the every-round view is bounded by RDP alone:
    /// its PLD over many rounds costs a large grid at every check, and it
    /// is the smaller view only when one round had far less noise than the
    /// others.
    fn evaluate(&self, groups: &[RoundGroup], worst: Option<&WorstDevice>) -> Result<Spent> {
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
}
