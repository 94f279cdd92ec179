//! Aggregation strategies: a rule that combines the round's updates into one
//! delta, and a server optimiser that applies it to the global model.
//!
//! | strategy | rule | server step |
//! | --- | --- | --- |
//! | FedAvg (McMahan et al., 2017) | weighted mean | `x += η·Δ` (η = 1 is plain FedAvg) |
//! | FedAvgM (Hsu et al., 2019) | weighted mean | momentum |
//! | FedAdagrad, FedAdam, FedYogi (Reddi et al., 2021) | weighted mean | adaptive |
//! | coordinate-wise median, trimmed mean (Yin et al., 2018) | robust | any |
//! | Krum, Multi-Krum (Blanchard et al., 2017) | robust | any |
//! | Bulyan (El Mhamdi et al., 2018) | robust | any |
//!
//! FedProx (Li et al., 2020) aggregates like FedAvg; its proximal term is
//! applied on the client (`fleet_models::TrainConfig::prox_mu`).
//!
//! Before any rule, each update may be limited relative to the fleet: the
//! [`RelativeBound`] (norm and weight within multiples of the previous
//! round's medians), then [`CentredClip`] (Karimireddy et al., 2021: its
//! deviation from the previous round's delta within the previous round's
//! median deviation). Both are on by default for new tasks.
//!
//! # Memory
//!
//! The weighted mean streams: it holds one f64 running sum, `8·d` bytes for
//! a model of `d` parameters, whatever the number of clients (with a
//! [`RelativeBound`], also 16 bytes a report, and in a round without a
//! basis its first `warmup` updates until they are in; with
//! [`CentredClip`], the reference, `4·d` bytes, and 8 bytes a report). Robust rules
//! need every update at once: they buffer at most
//! [`StrategyConfig::max_buffered`] updates (`4·d` bytes each) and refuse
//! further ones with [`Rejection::BufferFull`]; Krum and Bulyan add an
//! `n × n` f64 distance matrix.

use serde::{Deserialize, Serialize};

use crate::bound::{Basis, Limits, RelativeBound};
use crate::centred::{self, CentredClip, History};
use crate::check::{Admission, Update};
use crate::compute::{Compute, WeightedSum};
use crate::error::{Error, Rejection, Result, config};

/// How the round's updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Mean weighted by each update's weight (streaming).
    Mean,
    /// Coordinate-wise median (unweighted).
    Median,
    /// Coordinate-wise mean after dropping the `⌊β·n⌋` smallest and largest values.
    TrimmedMean {
        /// β in `[0, 0.5)`.
        beta: f64,
    },
    /// The single update with the smallest sum of squared distances to its
    /// `n − f − 2` nearest neighbours. Needs `n ≥ 2f + 3`.
    Krum {
        /// Byzantine updates tolerated.
        f: usize,
    },
    /// The mean of the `m` updates with the best Krum scores.
    MultiKrum {
        /// Byzantine updates tolerated.
        f: usize,
        /// Updates averaged.
        m: usize,
    },
    /// Krum applied repeatedly to select `θ = n − 2f` updates, then per
    /// coordinate the mean of the `θ − 2f` values closest to their median.
    /// Needs `n ≥ 4f + 3`.
    Bulyan {
        /// Byzantine updates tolerated.
        f: usize,
    },
}

/// The server optimiser (Reddi et al., 2021, Algorithm 2; Hsu et al., 2019
/// for momentum). Its element-wise rule is [`ServerOptimizer::apply`], the one
/// definition every compute backend follows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerOptimizer {
    /// `x += η·Δ`; FedAvg with `lr = 1`.
    Sgd {
        /// Server learning rate.
        lr: f32,
    },
    /// FedAvgM.
    Momentum {
        /// Server learning rate.
        lr: f32,
        /// Server momentum.
        momentum: f32,
    },
    /// FedAdagrad.
    Adagrad {
        /// Server learning rate.
        lr: f32,
        /// β₁.
        beta1: f32,
        /// τ, the adaptivity floor; `v` starts at τ².
        tau: f32,
    },
    /// FedAdam.
    Adam {
        /// Server learning rate.
        lr: f32,
        /// β₁.
        beta1: f32,
        /// β₂.
        beta2: f32,
        /// τ; `v` starts at τ².
        tau: f32,
    },
    /// FedYogi.
    Yogi {
        /// Server learning rate.
        lr: f32,
        /// β₁.
        beta1: f32,
        /// β₂.
        beta2: f32,
        /// τ; `v` starts at τ².
        tau: f32,
    },
}

impl ServerOptimizer {
    fn validate(&self) -> Result<()> {
        let (lr, b1, b2, tau) = match *self {
            ServerOptimizer::Sgd { lr } => (lr, 0.0, 0.0, 1.0),
            ServerOptimizer::Momentum { lr, momentum } => (lr, momentum, 0.0, 1.0),
            ServerOptimizer::Adagrad { lr, beta1, tau } => (lr, beta1, 0.0, tau),
            ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                tau,
            }
            | ServerOptimizer::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => (lr, beta1, beta2, tau),
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(config(
                "server lr",
                format!("{lr} must be a finite number > 0"),
            ));
        }
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return Err(config(
                "server beta",
                format!("β₁ = {b1}, β₂ = {b2}: each must be in [0, 1)"),
            ));
        }
        if !(tau.is_finite() && tau > 0.0) {
            return Err(config(
                "server tau",
                format!("{tau} must be a finite number > 0"),
            ));
        }
        Ok(())
    }

    fn initial_v(&self) -> f32 {
        match *self {
            ServerOptimizer::Adagrad { tau, .. }
            | ServerOptimizer::Adam { tau, .. }
            | ServerOptimizer::Yogi { tau, .. } => tau * tau,
            _ => 0.0,
        }
    }
}

/// A complete strategy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// How updates are combined.
    pub rule: Rule,
    /// How the combined delta moves the global model.
    pub server: ServerOptimizer,
    /// Largest accepted update L2 norm (`None`: any finite norm).
    pub max_norm: Option<f64>,
    /// Most updates a robust rule buffers in one round.
    pub max_buffered: usize,
    /// Norm and weight limits taken from the round's first reports
    /// ([`RelativeBound`]); on by default, absent (off) in definitions
    /// stored before it existed.
    #[serde(default)]
    pub bound: Option<RelativeBound>,
    /// Centred clipping around the previous round's delta
    /// ([`CentredClip`]), on top of the relative bound (which it needs); on
    /// by default, absent (off) in definitions stored before it existed.
    #[serde(default)]
    pub centred: Option<CentredClip>,
}

impl StrategyConfig {
    /// FedAvg: weighted mean, server learning rate 1.
    pub fn fedavg() -> Self {
        Self {
            rule: Rule::Mean,
            server: ServerOptimizer::Sgd { lr: 1.0 },
            max_norm: None,
            max_buffered: 1000,
            bound: Some(RelativeBound::DEFAULT),
            centred: Some(CentredClip::DEFAULT),
        }
    }

    /// FedAvgM with the given server learning rate and momentum.
    pub fn fedavgm(lr: f32, momentum: f32) -> Self {
        Self {
            server: ServerOptimizer::Momentum { lr, momentum },
            ..Self::fedavg()
        }
    }

    /// FedAdam with Reddi et al.'s defaults β₁ = 0.9, β₂ = 0.99.
    pub fn fedadam(lr: f32, tau: f32) -> Self {
        Self {
            server: ServerOptimizer::Adam {
                lr,
                beta1: 0.9,
                beta2: 0.99,
                tau,
            },
            ..Self::fedavg()
        }
    }

    /// FedYogi with β₁ = 0.9, β₂ = 0.99.
    pub fn fedyogi(lr: f32, tau: f32) -> Self {
        Self {
            server: ServerOptimizer::Yogi {
                lr,
                beta1: 0.9,
                beta2: 0.99,
                tau,
            },
            ..Self::fedavg()
        }
    }

    /// FedAdagrad with β₁ = 0.9 (Reddi et al. use momentum for every adaptive method).
    pub fn fedadagrad(lr: f32, tau: f32) -> Self {
        Self {
            server: ServerOptimizer::Adagrad {
                lr,
                beta1: 0.9,
                tau,
            },
            ..Self::fedavg()
        }
    }

    /// The same strategy with another rule.
    pub fn with_rule(self, rule: Rule) -> Self {
        Self { rule, ..self }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.server.validate()?;
        if let Some(b) = &self.bound {
            b.validate()?;
        }
        if let Some(c) = &self.centred {
            c.validate()?;
            if self.bound.is_none() {
                return Err(config(
                    "centred",
                    "centred clipping needs the relative bound (its first round clips nothing)",
                ));
            }
        }
        if let Some(b) = self.max_norm
            && !(b.is_finite() && b > 0.0)
        {
            return Err(config(
                "max_norm",
                format!("{b} must be a finite number > 0"),
            ));
        }
        match self.rule {
            Rule::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => Err(config(
                "beta",
                format!("trimmed-mean β = {beta} must be in [0, 0.5)"),
            )),
            Rule::MultiKrum { m: 0, .. } => {
                Err(config("m", "Multi-Krum must average at least one update"))
            }
            _ if self.max_buffered == 0 && self.rule != Rule::Mean => Err(config(
                "max_buffered",
                "a robust rule must buffer at least one update",
            )),
            _ => Ok(()),
        }
    }

    /// A fresh aggregator for one round.
    pub fn aggregator<'c>(
        &self,
        admission: Admission,
        compute: &'c dyn Compute,
    ) -> Result<Aggregator<'c>> {
        self.validate()?;
        let state = match self.rule {
            Rule::Mean => State::Streaming(compute.weighted_sum(admission.len)),
            _ => State::Buffered(Vec::new()),
        };
        Ok(Aggregator {
            rule: self.rule,
            capacity: self.max_buffered,
            admission: Admission {
                max_norm: self.max_norm.or(admission.max_norm),
                ..admission
            },
            compute,
            state,
            bound: self.bound,
            centred: self.centred,
            history: None,
            deviations: Vec::new(),
            recentred: 0,
            reference_weight: 0.0,
            warmup: Vec::new(),
            reference_sq: 0.0,
            basis: None,
            limits: None,
            seen: Vec::new(),
            bounded: 0,
            count: 0,
            declared_weight: 0.0,
            counted_weight: 0.0,
        })
    }

    /// The server-side state for a model of `len` parameters.
    pub fn server(&self, len: usize) -> Result<Server> {
        self.server.validate()?;
        Ok(Server {
            step: self.server,
            m: vec![0.0; len],
            v: vec![self.server.initial_v(); len],
        })
    }
}

enum State {
    Streaming(Box<dyn WeightedSum>),
    Buffered(Vec<Vec<f32>>),
}

/// Collects one round's updates; see the module docs for its memory.
pub struct Aggregator<'c> {
    rule: Rule,
    capacity: usize,
    admission: Admission,
    compute: &'c dyn Compute,
    state: State,
    bound: Option<RelativeBound>,
    centred: Option<CentredClip>,
    /// The previous round's history under centred clipping.
    history: Option<History>,
    /// Under centred clipping, every admitted report's deviation from the
    /// reference (from zero without a history), for the next radius.
    deviations: Vec<f64>,
    /// Reports whose deviation centred clipping shrank.
    recentred: usize,
    /// `Σ wᵢ(1 − cᵢ)`: the weight of the reference in the running sum.
    reference_weight: f64,
    /// Reports held until the limits are known: values, weight, measures.
    warmup: Vec<(Vec<f32>, f64, Measures)>,
    /// `Σ rᵢ²` of the history's reference.
    reference_sq: f64,
    /// The previous round's basis, if any.
    basis: Option<Basis>,
    limits: Option<Limits>,
    /// Norm and declared weight of every accepted report (the next basis).
    seen: Vec<(f64, f64)>,
    /// Reports scaled down or weight-capped by the limits.
    bounded: usize,
    count: usize,
    declared_weight: f64,
    /// Sum of weights as they count (after the limits), of the reports
    /// past the warm-up.
    counted_weight: f64,
}

/// What one pass over an update measures: `Σ xᵢ²`, and under centred
/// clipping `Σ xᵢ·rᵢ` with the reference `r` (identified by its address).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measures {
    sum_sq: f64,
    dot: Option<(f64, usize)>,
}

impl Measures {
    fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }
}

/// An update that passed [`Aggregator::check`], with what the check
/// measured. It borrows the update's values, so they cannot change before
/// [`Aggregator::add_checked`] takes it, which then does not read them again
/// to measure them.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'u> {
    update: Update<'u>,
    measures: Measures,
}

impl<'u> Checked<'u> {
    /// The update.
    pub fn update(&self) -> &Update<'u> {
        &self.update
    }

    /// Its L2 norm.
    pub fn norm(&self) -> f64 {
        self.measures.norm()
    }
}

/// The result of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The combined delta.
    pub delta: Vec<f32>,
    /// Updates accepted.
    pub updates: usize,
    /// Sum of their weights as they counted (after the relative bound's cap).
    pub total_weight: f64,
    /// For Krum-style rules, the indices (in arrival order) of the updates selected.
    pub selected: Option<Vec<usize>>,
    /// The round's limits under a [`RelativeBound`].
    pub limits: Option<Limits>,
    /// Under a [`RelativeBound`], the basis of the next round: this round's
    /// medians, risen at most [`RelativeBound::MAX_GROWTH`] times from the
    /// basis it had.
    pub basis: Option<Basis>,
    /// Updates the limits scaled down or counted with a capped weight.
    pub bounded: usize,
    /// Under [`CentredClip`], the history of the next round: this round's
    /// delta and lower median deviation.
    pub history: Option<History>,
    /// Updates whose deviation from the reference centred clipping shrank.
    pub recentred: usize,
}

impl Aggregator<'_> {
    /// The same aggregator with the previous round's `basis` (see
    /// [`RelativeBound`]): its limits are known from the start and nothing
    /// is held. No effect without a relative bound, or with no basis; call
    /// it before the first [`Aggregator::add`].
    pub fn with_basis(mut self, basis: Option<Basis>) -> Self {
        if let (Some(bound), Some(b)) = (self.bound, basis)
            && self.count == 0
        {
            self.basis = Some(b);
            self.limits = Some(bound.limits(b));
        }
        self
    }

    /// The same aggregator with the previous round's `history` (see
    /// [`CentredClip`]): every report's deviation from its reference is
    /// clipped to the round's radius. No effect without centred clipping,
    /// with no history, or with one that does not fit the model
    /// ([`History::is_valid`]); call it before the first [`Aggregator::add`].
    pub fn with_history(mut self, history: Option<History>) -> Self {
        if let (Some(_), Some(h)) = (self.centred, history)
            && self.count == 0
            && h.is_valid(self.admission.len)
        {
            self.reference_sq = crate::kernels::par_sum_squares(&h.reference);
            self.history = Some(h);
        }
        self
    }

    /// One pass over `values` (of the layout's length): their sum of
    /// squares, and their dot product with the reference under centred
    /// clipping with a history.
    fn measure(&self, values: &[f32]) -> Measures {
        match &self.history {
            Some(h) => {
                let (sum_sq, dot) = crate::kernels::par_sum_squares_dot(values, &h.reference);
                Measures {
                    sum_sq,
                    dot: Some((dot, h.reference.as_ptr() as usize)),
                }
            }
            None => Measures {
                sum_sq: crate::kernels::par_sum_squares(values),
                dot: None,
            },
        }
    }

    /// Whether `m` was measured against this aggregator's reference.
    fn measured_here(&self, m: &Measures) -> bool {
        match (&self.history, m.dot) {
            (Some(h), Some((_, at))) => h.reference.as_ptr() as usize == at,
            (None, None) => true,
            _ => false,
        }
    }

    /// Whether [`Aggregator::add`] would take `u`, changing nothing: the
    /// admission checks (with the strategy's norm bound) and, for a robust
    /// rule, room in the buffer. An update that passes is added by the next
    /// [`Aggregator::add_checked`] (or `add`) of the same aggregator without
    /// fail; `add_checked` takes what this check measured instead of
    /// reading the values again.
    pub fn check<'u>(&self, u: &Update<'u>) -> std::result::Result<Checked<'u>, Rejection> {
        self.admission.check_shape(u)?;
        let measures = self.measure(u.values);
        self.admission.check_norm(u, measures.norm())?;
        self.check_room()?;
        Ok(Checked {
            update: *u,
            measures,
        })
    }

    /// For a robust rule, room in the buffer.
    fn check_room(&self) -> std::result::Result<(), Rejection> {
        if let State::Buffered(rows) = &self.state
            && rows.len() + self.warmup.len() >= self.capacity
        {
            return Err(Rejection::BufferFull {
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Checks `u` ([`Aggregator::check`]) and adds it. On rejection nothing
    /// changes. Under a [`RelativeBound`] the first reports are held until
    /// their medians set the round's limits, then every report is added
    /// within them.
    pub fn add(&mut self, u: &Update<'_>) -> std::result::Result<(), Rejection> {
        let checked = self.check(u)?;
        self.add_checked(checked)
    }

    /// Adds an update that passed [`Aggregator::check`], using what the
    /// check measured (measured again if the check was another
    /// aggregator's). The buffer's room is checked again: other updates may
    /// have filled it since. On rejection nothing changes.
    pub fn add_checked(&mut self, checked: Checked<'_>) -> std::result::Result<(), Rejection> {
        let Checked {
            update: u,
            measures,
        } = checked;
        if !self.measured_here(&measures) {
            return self.add(&u);
        }
        // Cheap, and the check may have been another aggregator's.
        self.admission.check_shape(&u)?;
        self.admission.check_norm(&u, measures.norm())?;
        self.check_room()?;
        let norm = measures.norm();
        self.count += 1;
        self.declared_weight += u.weight;
        if self.bound.is_some() {
            self.seen.push((norm, u.weight));
        }
        match (self.bound, self.limits) {
            (Some(bound), None) => {
                self.warmup.push((u.values.to_vec(), u.weight, measures));
                if self.warmup.len() >= bound.warmup as usize {
                    self.fix_limits(bound);
                }
            }
            _ => self.admit(u.values, u.weight, measures),
        }
        Ok(())
    }

    /// Sets the limits from the held reports and adds them.
    fn fix_limits(&mut self, bound: RelativeBound) {
        let held = std::mem::take(&mut self.warmup);
        let norms: Vec<f64> = held.iter().map(|h| h.2.norm()).collect();
        let weights: Vec<f64> = held.iter().map(|h| h.1).collect();
        self.limits = Basis::of(&norms, &weights).map(|b| bound.limits(b));
        for (values, weight, measures) in held {
            self.admit(&values, weight, measures);
        }
    }

    /// Adds one report within the round's limits, if any.
    fn admit(&mut self, values: &[f32], weight: f64, measures: Measures) {
        let norm = measures.norm();
        let (scale, counted) = match self.limits {
            Some(l) => l.apply(norm, weight),
            None => (1.0, weight),
        };
        if scale < 1.0 || counted < weight {
            self.bounded += 1;
        }
        // Centred clipping: y = c·s·x + (1 − c)·r.
        let mut c = 1.0;
        if self.centred.is_some() {
            match &self.history {
                Some(h) => {
                    let radius = self.centred.map_or(0.0, |cc| cc.radius(h));
                    let (deviation, factor) = match measures.dot {
                        // ‖s·x − r‖² = s²·Σx² − 2s·Σx·r + Σr², from the
                        // check's one pass (rounding can take a deviation
                        // of nearly zero below zero: it is zero then).
                        Some((dot, _)) => {
                            let d2 = scale * scale * measures.sum_sq - 2.0 * scale * dot
                                + self.reference_sq;
                            centred::factor(d2.max(0.0).sqrt(), radius)
                        }
                        None => centred::clip(values, scale, &h.reference, radius),
                    };
                    self.deviations.push(deviation);
                    c = factor;
                }
                None => self.deviations.push(scale * norm),
            }
        }
        if c < 1.0 {
            self.recentred += 1;
        }
        let reference = self.history.as_ref().map(|h| h.reference.as_slice());
        match (&mut self.state, reference) {
            // The sum takes the scale in the weight: Σ wᵢ·cᵢ·sᵢ·xᵢ, plus
            // Σ wᵢ(1 − cᵢ)·r at the end, over Σ wᵢ.
            (State::Streaming(sum), _) => sum.add(counted * c * scale, values),
            (State::Buffered(rows), Some(r)) if c < 1.0 => rows.push(
                values
                    .iter()
                    .zip(r)
                    .map(|(&v, &r)| (c * scale * f64::from(v) + (1.0 - c) * f64::from(r)) as f32)
                    .collect(),
            ),
            (State::Buffered(rows), _) if scale < 1.0 => rows.push(
                values
                    .iter()
                    .map(|&v| (f64::from(v) * scale) as f32)
                    .collect(),
            ),
            (State::Buffered(rows), _) => rows.push(values.to_vec()),
        }
        self.reference_weight += counted * (1.0 - c);
        self.counted_weight += counted;
    }

    /// Updates accepted so far.
    pub fn accepted(&self) -> usize {
        self.count
    }

    /// Sum of the accepted updates' weights as declared (before any cap of
    /// a [`RelativeBound`]).
    pub fn total_weight(&self) -> f64 {
        self.declared_weight
    }

    /// Combines the accepted updates.
    pub fn finish(mut self) -> Result<Aggregate> {
        if let Some(bound) = self.bound
            && !self.warmup.is_empty()
        {
            self.fix_limits(bound);
        }
        let next_basis = if self.bound.is_some() {
            let norms: Vec<f64> = self.seen.iter().map(|s| s.0).collect();
            let weights: Vec<f64> = self.seen.iter().map(|s| s.1).collect();
            Basis::of(&norms, &weights).map(|b| b.capped_by(self.basis))
        } else {
            None
        };
        let n = self.count;
        let too_few = |rule, needed| {
            Err(Error::TooFew {
                rule,
                needed,
                got: n,
            })
        };
        if n == 0 {
            return too_few("aggregation", 1);
        }
        let mut selected = None;
        let delta = match self.state {
            State::Streaming(sum) => {
                let w = self.counted_weight;
                let sum = sum.finish()?;
                match &self.history {
                    Some(h) if self.reference_weight > 0.0 => {
                        let k = self.reference_weight;
                        sum.into_iter()
                            .zip(&h.reference)
                            .map(|(s, &r)| ((s + k * f64::from(r)) / w) as f32)
                            .collect()
                    }
                    _ => sum.into_iter().map(|s| (s / w) as f32).collect(),
                }
            }
            State::Buffered(rows) => match self.rule {
                Rule::Mean => unreachable!("the mean streams"),
                Rule::Median => self.compute.median(&rows),
                Rule::TrimmedMean { beta } => {
                    let trim = (beta * n as f64).floor() as usize;
                    self.compute.trimmed_mean(&rows, trim)
                }
                Rule::Krum { f } => {
                    if n < 2 * f + 3 {
                        return too_few("Krum", 2 * f + 3);
                    }
                    let d = self.compute.squared_distances(&rows);
                    let best = krum_order(&d, n, &(0..n).collect::<Vec<_>>(), f)[0];
                    selected = Some(vec![best]);
                    rows[best].clone()
                }
                Rule::MultiKrum { f, m } => {
                    if n < 2 * f + 3 {
                        return too_few("Multi-Krum", 2 * f + 3);
                    }
                    let d = self.compute.squared_distances(&rows);
                    let mut chosen = krum_order(&d, n, &(0..n).collect::<Vec<_>>(), f);
                    chosen.truncate(m.min(n));
                    let avg = average(
                        &chosen
                            .iter()
                            .map(|&i| rows[i].as_slice())
                            .collect::<Vec<_>>(),
                    );
                    selected = Some(chosen);
                    avg
                }
                Rule::Bulyan { f } => {
                    if n < 4 * f + 3 {
                        return too_few("Bulyan", 4 * f + 3);
                    }
                    let d = self.compute.squared_distances(&rows);
                    let theta = n - 2 * f;
                    let mut remaining: Vec<usize> = (0..n).collect();
                    let mut chosen = Vec::with_capacity(theta);
                    while chosen.len() < theta {
                        // Krum over the remaining set; with fewer than 2f + 3 left,
                        // the neighbourhood shrinks to what remains (at least one).
                        let best = krum_order(&d, n, &remaining, f)[0];
                        chosen.push(best);
                        remaining.retain(|&i| i != best);
                    }
                    let picked: Vec<Vec<f32>> = chosen.iter().map(|&i| rows[i].clone()).collect();
                    selected = Some(chosen);
                    self.compute.mean_around_median(&picked, theta - 2 * f)
                }
            },
        };
        let history = if self.centred.is_some() {
            History::next(
                &delta,
                &self.deviations,
                self.history.as_ref().map(|h| h.radius),
            )
        } else {
            None
        };
        Ok(Aggregate {
            history,
            recentred: self.recentred,
            delta,
            updates: n,
            total_weight: self.counted_weight,
            selected,
            limits: self.limits,
            basis: next_basis,
            bounded: self.bounded,
        })
    }
}

/// Indices of `set` sorted by Krum score (best first, ties by index): the
/// sum of squared distances to the `|set| − f − 2` nearest others (at least one).
fn krum_order(d: &[f64], n: usize, set: &[usize], f: usize) -> Vec<usize> {
    let k = set
        .len()
        .saturating_sub(f + 2)
        .max(1)
        .min(set.len().saturating_sub(1));
    let mut scored: Vec<(f64, usize)> = set
        .iter()
        .map(|&i| {
            let mut dist: Vec<f64> = set
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| d[i * n + j])
                .collect();
            dist.sort_unstable_by(f64::total_cmp);
            (dist[..k].iter().sum(), i)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

fn average(rows: &[&[f32]]) -> Vec<f32> {
    let len = rows.first().map_or(0, |r| r.len());
    (0..len)
        .map(|j| (rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / rows.len() as f64) as f32)
        .collect()
}

/// The strategies by name, as task definitions and fleet files give them,
/// with Reddi et al.'s defaults: server learning rate 1 for FedAvg and
/// FedAvgM (momentum 0.9), 0.01 for the adaptive optimisers (τ = 10⁻³);
/// trimmed mean drops 10% at each end; Krum means Multi-Krum tolerating
/// `⌊(n − 3)/2⌋` Byzantine updates and averaging `n/2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// Weighted mean, server learning rate 1 (or as given).
    Fedavg,
    /// FedAvg with server momentum 0.9.
    Fedavgm,
    /// FedAdam.
    Fedadam,
    /// FedYogi.
    Fedyogi,
    /// FedAdagrad.
    Fedadagrad,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean (β = 0.1).
    TrimmedMean,
    /// Multi-Krum.
    Krum,
}

impl StrategyName {
    /// Every name, in order.
    pub const ALL: [StrategyName; 8] = [
        StrategyName::Fedavg,
        StrategyName::Fedavgm,
        StrategyName::Fedadam,
        StrategyName::Fedyogi,
        StrategyName::Fedadagrad,
        StrategyName::Median,
        StrategyName::TrimmedMean,
        StrategyName::Krum,
    ];

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyName::Fedavg => "fedavg",
            StrategyName::Fedavgm => "fedavgm",
            StrategyName::Fedadam => "fedadam",
            StrategyName::Fedyogi => "fedyogi",
            StrategyName::Fedadagrad => "fedadagrad",
            StrategyName::Median => "median",
            StrategyName::TrimmedMean => "trimmed-mean",
            StrategyName::Krum => "krum",
        }
    }

    /// The strategy, with `server_lr` overriding the default server learning
    /// rate, for rounds of about `reports` updates (Krum's parameters).
    pub fn config(self, server_lr: Option<f32>, reports: usize) -> StrategyConfig {
        let lr = server_lr;
        match self {
            StrategyName::Fedavg => StrategyConfig {
                server: ServerOptimizer::Sgd {
                    lr: lr.unwrap_or(1.0),
                },
                ..StrategyConfig::fedavg()
            },
            StrategyName::Fedavgm => StrategyConfig::fedavgm(lr.unwrap_or(1.0), 0.9),
            StrategyName::Fedadam => StrategyConfig::fedadam(lr.unwrap_or(0.01), 1e-3),
            StrategyName::Fedyogi => StrategyConfig::fedyogi(lr.unwrap_or(0.01), 1e-3),
            StrategyName::Fedadagrad => StrategyConfig::fedadagrad(lr.unwrap_or(0.01), 1e-3),
            StrategyName::Median => StrategyConfig::fedavg().with_rule(Rule::Median),
            StrategyName::TrimmedMean => {
                StrategyConfig::fedavg().with_rule(Rule::TrimmedMean { beta: 0.1 })
            }
            StrategyName::Krum => StrategyConfig::fedavg().with_rule(Rule::MultiKrum {
                f: reports.saturating_sub(3) / 2,
                m: (reports / 2).max(1),
            }),
        }
    }
}

impl std::str::FromStr for StrategyName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        fleet_models::spec::parse_name("strategy", s, &Self::ALL, |n| n.as_str())
    }
}

/// Server-optimiser state for one task: the global model moves by [`Server::apply`].
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    step: ServerOptimizer,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Server {
    /// Moves `global` by the round's combined `delta`.
    pub fn apply(
        &mut self,
        compute: &dyn Compute,
        global: &mut [f32],
        delta: &[f32],
    ) -> Result<()> {
        if global.len() != delta.len() || global.len() != self.m.len() {
            return Err(config(
                "delta",
                format!(
                    "global has {} values, delta {}, optimiser state {}",
                    global.len(),
                    delta.len(),
                    self.m.len()
                ),
            ));
        }
        compute.server_step(&self.step, global, delta, &mut self.m, &mut self.v);
        Ok(())
    }

    /// The first and second moment buffers (for persistence).
    pub fn state(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// Restores persisted moment buffers.
    pub fn restore(&mut self, m: Vec<f32>, v: Vec<f32>) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(config(
                "server state",
                "moment buffers do not match the model length",
            ));
        }
        self.m = m;
        self.v = v;
        Ok(())
    }
}
