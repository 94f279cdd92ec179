//! Gaussian noise from opendp: the reference mechanism.
//!
//! Used for small queries (adaptive clipping's count) and as the reference
//! the fast whole-update sampler in [`super::discrete`] is tested against;
//! on f32's finest grid it costs 17–22 s per million values here, far
//! more than local training, so updates are noised by that sampler instead.
//!
//! [`add_gaussian`] builds opendp's Gaussian measurement over a vector of
//! `f32` with L2 sensitivity and invokes it: opendp adds noise from the
//! discrete Gaussian on the finest grid the float type resolves (2^-149 for
//! f32) with exact arithmetic, and, with the `use-openssl` feature, draws its
//! bits from OpenSSL's secure generator. A `Measurement` is not `Send`, so it
//! is built and dropped inside the call and never crosses an `.await`.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

use crate::error::{Error, Result};

/// Adds independent `N(0, std²)` noise (opendp's exact sampler) to every value of `x`.
pub fn add_gaussian(x: &mut [f32], std: f64) -> Result<()> {
    add_gaussian_on_grid(x, std, None)
}

/// As [`add_gaussian`], with the noise drawn from the discrete Gaussian on
/// the grid `2^k` (`None`: the finest grid of f32, opendp's default).
pub fn add_gaussian_on_grid(x: &mut [f32], std: f64, k: Option<i32>) -> Result<()> {
    if !(std.is_finite() && std >= 0.0) {
        return Err(crate::error::config(
            "noise std",
            format!("{std} must be a finite number >= 0"),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Privacy(format!(
            "cannot add noise to non-finite value at {i}"
        )));
    }
    let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<f32>::new_non_nan()).with_size(x.len()),
        L2Distance::<f32>::default(),
        std,
        k,
    )
    .map_err(|e| Error::Privacy(format!("building opendp's Gaussian mechanism: {e}")))?;
    let noisy = meas
        .invoke(&x.to_vec())
        .map_err(|e| Error::Privacy(format!("opendp's Gaussian mechanism failed: {e}")))?;
    x.copy_from_slice(&noisy);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_has_the_requested_spread() {
        let mut x = vec![1.0f32; 20_000];
        add_gaussian(&mut x, 0.5).unwrap();
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard errors: mean 0.0035, std about 0.0025.
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.015, "std {}", var.sqrt());
        // Tails: about 4.55% of samples beyond 2σ.
        let beyond = x
            .iter()
            .filter(|&&v| (f64::from(v) - 1.0).abs() > 1.0)
            .count() as f64
            / n;
        assert!((beyond - 0.0455).abs() < 0.006, "{beyond}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(add_gaussian(&mut [0.0], -1.0).is_err());
        assert!(add_gaussian(&mut [f32::NAN], 1.0).is_err());
        let mut zero = vec![0.25f32; 4];
        add_gaussian(&mut zero, 0.0).unwrap();
        assert_eq!(zero, vec![0.25; 4]);
    }
}
