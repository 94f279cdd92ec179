//! Admission checks applied to every update before it touches an aggregate.

use fleet_models::LayoutFingerprint;

use crate::error::Rejection;

/// What an update must satisfy to be added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    /// Layout fingerprint of the round's model.
    pub fingerprint: LayoutFingerprint,
    /// Number of values of the layout.
    pub len: usize,
    /// Largest accepted L2 norm; `None` accepts any finite norm.
    pub max_norm: Option<f64>,
}

/// One update offered to an aggregator.
#[derive(Debug, Clone, Copy)]
pub struct Update<'a> {
    /// Layout the sender computed it for.
    pub fingerprint: LayoutFingerprint,
    /// The update (a parameter delta), in flat layout.
    pub values: &'a [f32],
    /// Its weight, usually the number of local examples.
    pub weight: f64,
}

/// The weight of a report in the round's aggregate: its number of local
/// examples (FedAvg), or 1 for every report of a private task, whose
/// aggregate divides by a fixed count so that one device's influence is
/// bounded by the clipping norm whatever its data size.
pub fn report_weight(private: bool, examples: u64) -> f64 {
    if private { 1.0 } else { examples as f64 }
}

impl Admission {
    /// Checks layout, length, finiteness, norm and weight; returns the L2 norm.
    pub fn check(&self, u: &Update<'_>) -> Result<f64, Rejection> {
        self.check_shape(u)?;
        let norm = l2_norm(u.values);
        self.check_norm(u, norm)?;
        Ok(norm)
    }

    /// The checks that read no values: layout, length and weight.
    pub fn check_shape(&self, u: &Update<'_>) -> Result<(), Rejection> {
        if u.fingerprint != self.fingerprint {
            return Err(Rejection::Layout {
                expected: self.fingerprint,
                found: u.fingerprint,
            });
        }
        if u.values.len() != self.len {
            return Err(Rejection::Length {
                expected: self.len,
                found: u.values.len(),
            });
        }
        if !(u.weight.is_finite() && u.weight > 0.0) {
            return Err(Rejection::Weight(u.weight));
        }
        Ok(())
    }

    /// The checks on `u`'s L2 norm `norm` (computed by the caller): finite
    /// (no NaN or infinite value) and within the bound.
    pub fn check_norm(&self, u: &Update<'_>, norm: f64) -> Result<(), Rejection> {
        if !norm.is_finite() {
            let index = u.values.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(Rejection::NonFinite {
                index,
                value: u.values[index],
            });
        }
        if let Some(bound) = self.max_norm
            && norm > bound
        {
            return Err(Rejection::NormTooLarge { norm, bound });
        }
        Ok(())
    }
}

/// L2 norm accumulated in f64 (NaN or infinite when a value is), on the
/// calling thread (the agent clips with it and starts no thread pool); the
/// same bits as the aggregator's measure of the same values.
pub fn l2_norm(v: &[f32]) -> f64 {
    crate::kernels::chunked_sum_squares(v).sqrt()
}
