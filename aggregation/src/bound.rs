//! Bounds relative to the fleet's typical report.
//!
//! A device chooses both its update and, in a task without DP, its weight
//! (its declared example count). An absolute norm bound needs a number the
//! operator rarely knows before training, and an absolute weight cap still
//! lets one device claim thousands of times what its peers hold. A
//! [`RelativeBound`] takes its limits from the reports themselves: every
//! report of a round is scaled down to at most `norm_factor` times a
//! [`Basis`] norm and counts with at most `weight_factor` times a basis
//! weight.
//!
//! The basis of a round is the lower median of the L2 norms and of the
//! weights of **all** the reports of the previous round, as they arrived
//! (before any limit), and it may rise at most [`RelativeBound::MAX_GROWTH`]
//! times from one round to the next (it may fall freely). A round without a
//! previous one (the first) takes its basis from its own first `warmup`
//! reports, which it holds until they are in.
//!
//! Robustness: a hostile report moves the round's mean by at most
//! `weight_factor · norm_factor · basis norm · basis weight / Σ weights`,
//! whatever it sends (`f32::MAX` values, the largest weight the task
//! allows). The basis is an honest report's as long as hostile reports are
//! fewer than half of the previous round's (of the first round's first
//! `warmup`); a round where they were more can at most double the next
//! round's limits, and the round after that is back to the honest medians.
//! The bound does not look at directions: a hostile device that sends the
//! same direction every round moves the model by up to `norm_factor` basis
//! norms that way each time, and honest updates, which vary, do not cancel
//! it. [`CentredClip`](crate::CentredClip), on by default on top of the
//! bound, clips each report's deviation from the previous round's delta
//! instead (docs/benchmarks.md, "Hostile devices", has the figures).
//!
//! Memory: the norm and weight of each report of the round (16 bytes each),
//! and, in a round without a basis, its first `warmup` updates (`4·d` bytes
//! each) until they are in; a streaming mean otherwise streams as before.
//! Determinism: the limits depend only on the previous round's reports, or
//! on the order of the first reports; a coordinator that resumes a round
//! re-adds its stored reports in their arrival order and keeps the basis
//! with the task, so it reaches the same limits.

use serde::{Deserialize, Serialize};

use crate::error::{Result, config};

/// Limits of a round taken from its first reports; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelativeBound {
    /// In a round without a basis (the first), the reports whose medians
    /// set it (the round's first accepted ones), 1 to
    /// [`RelativeBound::MAX_WARMUP`].
    pub warmup: u32,
    /// A report's norm is scaled down to at most this times the basis norm (≥ 1).
    pub norm_factor: f64,
    /// A report counts with at most this times the basis weight (≥ 1).
    pub weight_factor: f64,
}

impl Default for RelativeBound {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl RelativeBound {
    /// The default of new tasks: norms within twice the basis norm, weights
    /// at most the basis weight (no report counts more than the typical
    /// one); the first round's basis from its first 10 reports.
    pub const DEFAULT: Self = Self {
        warmup: 10,
        norm_factor: 2.0,
        weight_factor: 1.0,
    };

    /// Most a basis may rise from one round to the next (a factor).
    pub const MAX_GROWTH: f64 = 2.0;

    /// Most reports held before the limits are known (their memory is
    /// `4·d` bytes each).
    pub const MAX_WARMUP: u32 = 64;

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        if !(1..=Self::MAX_WARMUP).contains(&self.warmup) {
            return Err(config(
                "bound.warmup",
                format!("{} must be between 1 and {}", self.warmup, Self::MAX_WARMUP),
            ));
        }
        for (field, v) in [
            ("bound.norm_factor", self.norm_factor),
            ("bound.weight_factor", self.weight_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return Err(config(field, format!("{v} must be a finite number ≥ 1")));
            }
        }
        Ok(())
    }

    /// The limits a round of basis `basis` applies.
    pub fn limits(&self, basis: Basis) -> Limits {
        Limits {
            norm: self.norm_factor * basis.norm,
            weight: self.weight_factor * basis.weight,
        }
    }
}

/// The typical report a round's limits are relative to: lower medians of
/// L2 norms and of weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Basis {
    /// Lower median L2 norm.
    pub norm: f64,
    /// Lower median weight.
    pub weight: f64,
}

impl Basis {
    /// The basis of reports of L2 norms `norms` and weights `weights` (the
    /// same reports); none without reports.
    pub fn of(norms: &[f64], weights: &[f64]) -> Option<Basis> {
        Some(Basis {
            norm: lower_median(norms)?,
            weight: lower_median(weights)?,
        })
    }

    /// This basis, risen at most [`RelativeBound::MAX_GROWTH`] times from
    /// `previous` (a basis may fall freely).
    pub fn capped_by(self, previous: Option<Basis>) -> Basis {
        match previous {
            Some(p) => Basis {
                norm: self.norm.min(RelativeBound::MAX_GROWTH * p.norm),
                weight: self.weight.min(RelativeBound::MAX_GROWTH * p.weight),
            },
            None => self,
        }
    }

    /// Whether both figures are finite and not negative (a stored basis is
    /// checked with this before it is used).
    pub fn is_valid(&self) -> bool {
        self.norm.is_finite() && self.norm >= 0.0 && self.weight.is_finite() && self.weight > 0.0
    }
}

/// The limits of one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest L2 norm a report keeps.
    pub norm: f64,
    /// Largest weight a report counts with.
    pub weight: f64,
}

impl Limits {
    /// The factor a report of L2 norm `norm` is scaled by (at most 1) and
    /// the weight it counts with, for a declared `weight`.
    pub fn apply(&self, norm: f64, weight: f64) -> (f64, f64) {
        let scale = if norm > self.norm {
            self.norm / norm
        } else {
            1.0
        };
        (scale, weight.min(self.weight))
    }
}

/// The lower of the two middle values (the middle one for an odd count):
/// never above an honest value while honest values are a majority.
pub(crate) fn lower_median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    Some(v[(v.len() - 1) / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basis_is_the_lower_median_and_limits_are_its_multiples() {
        let b = Basis::of(&[1.0, 100.0, 2.0, 3.0], &[10.0, 1e6, 20.0, 30.0]).unwrap();
        assert_eq!(
            b,
            Basis {
                norm: 2.0,
                weight: 20.0
            }
        );
        let l = RelativeBound::DEFAULT.limits(b);
        assert_eq!((l.norm, l.weight), (4.0, 20.0));
        assert_eq!(
            Basis::of(&[5.0], &[7.0]),
            Some(Basis {
                norm: 5.0,
                weight: 7.0
            })
        );
        assert_eq!(Basis::of(&[], &[]), None);
    }

    #[test]
    fn a_minority_of_huge_reports_leaves_the_basis_an_honest_value() {
        // Two huge reports among five: the lower median is the largest of
        // the three honest ones.
        let attacked = Basis::of(
            &[1.0, f64::MAX, 1.1, 0.9, f64::MAX],
            &[100.0, 1e6, 120.0, 80.0, 1e6],
        );
        assert_eq!(
            attacked,
            Some(Basis {
                norm: 1.1,
                weight: 120.0
            })
        );
    }

    #[test]
    fn a_basis_at_most_doubles_from_round_to_round_and_falls_freely() {
        let prev = Basis {
            norm: 1.0,
            weight: 10.0,
        };
        let huge = Basis {
            norm: 1e30,
            weight: 1e9,
        };
        assert_eq!(
            huge.capped_by(Some(prev)),
            Basis {
                norm: 2.0,
                weight: 20.0
            }
        );
        let small = Basis {
            norm: 0.1,
            weight: 3.0,
        };
        assert_eq!(small.capped_by(Some(prev)), small);
        assert_eq!(huge.capped_by(None), huge);
        assert!(prev.is_valid());
        assert!(
            !Basis {
                norm: f64::NAN,
                weight: 1.0
            }
            .is_valid()
        );
        assert!(
            !Basis {
                norm: 1.0,
                weight: 0.0
            }
            .is_valid()
        );
    }

    #[test]
    fn apply_scales_down_and_caps_only_above_the_limits() {
        let l = Limits {
            norm: 2.0,
            weight: 10.0,
        };
        assert_eq!(l.apply(1.0, 5.0), (1.0, 5.0));
        assert_eq!(l.apply(8.0, 50.0), (0.25, 10.0));
        assert_eq!(l.apply(0.0, 1.0), (1.0, 1.0));
    }

    #[test]
    fn validate_refuses_what_would_not_bound() {
        let ok = RelativeBound::DEFAULT;
        assert!(ok.validate().is_ok());
        for bad in [
            RelativeBound { warmup: 0, ..ok },
            RelativeBound {
                warmup: RelativeBound::MAX_WARMUP + 1,
                ..ok
            },
            RelativeBound {
                norm_factor: 0.5,
                ..ok
            },
            RelativeBound {
                weight_factor: f64::INFINITY,
                ..ok
            },
            RelativeBound {
                norm_factor: f64::NAN,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
