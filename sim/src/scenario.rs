//! Scenarios: what happens to a share of the devices.
//!
//! Update-side scenarios (Byzantine devices) act on a device's delta after
//! local training and before privacy and encoding, as a compromised device
//! would. Data-side scenarios (drift from a given monitoring window) change
//! a device's examples where they are used: [`drift_example`] transforms one
//! example in place, [`drifted_data`] a device's whole training set. Images
//! are transformed in pixel space (intensities 0–1, undoing and redoing the
//! input normalisation); other data sets only take noise, on the features.

use fleet_models::data::fashion::NORM;
use fleet_models::{DataRef, Dataset};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::fleet::{Attack, DriftKind, DriftScenario};

/// Which devices drift, and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    /// The scenario.
    pub scenario: DriftScenario,
    /// Devices with this id or larger drift.
    pub first_device: u32,
}

impl Drift {
    /// The last `scenario.fraction` of `devices` drift.
    pub fn new(scenario: DriftScenario, devices: u32) -> Self {
        let drifting = (scenario.fraction * f64::from(devices)).round() as u32;
        Self {
            scenario,
            first_device: devices - drifting.min(devices),
        }
    }

    /// Whether `device` drifts.
    pub fn affects(&self, device: u32) -> bool {
        device >= self.first_device
    }

    /// Whether the training data changes too (every kind but label shift).
    pub fn changes_training(&self) -> bool {
        self.scenario.kind != DriftKind::Labels
    }
}

/// Transforms one example `x` (normalised, of `shape`) in place.
pub fn drift_example(
    kind: DriftKind,
    strength: f32,
    x: &mut [f32],
    shape: &[usize],
    rng: &mut ChaCha8Rng,
) {
    let image = shape.len() == 3;
    type Map = fn(f32) -> f32;
    let (to_pixel, from_pixel): (Map, Map) = if image {
        (
            |v: f32| v * NORM.std + NORM.mean,
            |p: f32| (p.clamp(0.0, 1.0) - NORM.mean) / NORM.std,
        )
    } else {
        (|v: f32| v, |p: f32| p)
    };
    match kind {
        DriftKind::Brightness => x
            .iter_mut()
            .for_each(|v| *v = from_pixel(to_pixel(*v) + strength)),
        DriftKind::Contrast => x
            .iter_mut()
            .for_each(|v| *v = from_pixel(0.5 + (to_pixel(*v) - 0.5) * strength)),
        DriftKind::Noise => {
            let normal = Normal::new(0.0, f64::from(strength)).expect("validated σ");
            x.iter_mut()
                .for_each(|v| *v = from_pixel(to_pixel(*v) + normal.sample(rng) as f32));
        }
        DriftKind::Rotation => {
            let (h, w) = (shape[1], shape[2]);
            let src: Vec<f32> = x.iter().map(|&v| to_pixel(v)).collect();
            rotate(&src, h, w, strength, x);
            x.iter_mut().for_each(|v| *v = from_pixel(*v));
        }
        // Label shift changes which inputs are served, not the inputs.
        DriftKind::Labels => {}
    }
}

/// Rotates each `h × w` plane of `src` by `degrees` (counter-clockwise)
/// about its centre, bilinear, zero outside: writes into `out`.
fn rotate(src: &[f32], h: usize, w: usize, degrees: f32, out: &mut [f32]) {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let at = |plane: &[f32], y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            plane[y as usize * w + x as usize]
        }
    };
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        for i in 0..h {
            for j in 0..w {
                // Inverse map: where does output (i, j) come from?
                let (dy, dx) = (i as f32 - cy, j as f32 - cx);
                let sy = c * dy + s * dx + cy;
                let sx = c * dx - s * dy + cx;
                let (y0, x0) = (sy.floor(), sx.floor());
                let (fy, fx) = (sy - y0, sx - x0);
                let (y0, x0) = (y0 as isize, x0 as isize);
                dst[i * w + j] = (1.0 - fy)
                    * ((1.0 - fx) * at(plane, y0, x0) + fx * at(plane, y0, x0 + 1))
                    + fy * ((1.0 - fx) * at(plane, y0 + 1, x0) + fx * at(plane, y0 + 1, x0 + 1));
            }
        }
    }
}

/// A drifted copy of a device's training data (labels unchanged).
pub fn drifted_data(
    data: DataRef<'_>,
    scenario: &DriftScenario,
    rng: &mut ChaCha8Rng,
) -> Result<Dataset, String> {
    let set = data.dataset();
    let dim = set.dim();
    let mut features = Vec::with_capacity(data.len() * dim);
    let mut labels = Vec::with_capacity(data.len());
    for i in 0..data.len() {
        let (x, y) = data.get(i);
        let start = features.len();
        features.extend_from_slice(x);
        drift_example(
            scenario.kind,
            scenario.strength,
            &mut features[start..],
            set.shape(),
            rng,
        );
        labels.push(y);
    }
    Dataset::new(
        features,
        labels,
        set.shape().to_vec(),
        set.classes(),
        set.label_names().to_vec(),
    )
    .map_err(|e| e.to_string())
}

/// Applies a Byzantine `attack` of factor `scale` to `delta`.
pub fn corrupt_update(attack: Attack, scale: f32, delta: &mut [f32]) {
    let factor = match attack {
        Attack::SignFlip => -scale,
        Attack::Scaled => scale,
        Attack::MaxValues => {
            delta.fill(f32::MAX);
            return;
        }
    };
    for v in delta {
        *v *= factor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_flip_or_scale() {
        let mut d = vec![1.0, -2.0];
        corrupt_update(Attack::SignFlip, 3.0, &mut d);
        assert_eq!(d, vec![-3.0, 6.0]);
        corrupt_update(Attack::Scaled, 0.5, &mut d);
        assert_eq!(d, vec![-1.5, 3.0]);
        corrupt_update(Attack::MaxValues, 0.5, &mut d);
        assert_eq!(d, vec![f32::MAX, f32::MAX]);
    }

    fn pixels(x: &[f32]) -> Vec<f32> {
        x.iter().map(|v| v * NORM.std + NORM.mean).collect()
    }

    fn image(f: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut x = Vec::new();
        for i in 0..28 {
            for j in 0..28 {
                x.push((f(i, j) - NORM.mean) / NORM.std);
            }
        }
        x
    }

    #[test]
    fn brightness_and_contrast_act_on_clamped_intensities() {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let shape = [1, 28, 28];
        let mut x = image(|i, _| if i < 14 { 0.2 } else { 0.9 });
        drift_example(DriftKind::Brightness, 0.3, &mut x, &shape, &mut rng);
        let p = pixels(&x);
        assert!((p[0] - 0.5).abs() < 1e-5 && (p[27 * 28] - 1.0).abs() < 1e-5);
        let mut x = image(|i, _| if i < 14 { 0.2 } else { 0.9 });
        drift_example(DriftKind::Contrast, 0.5, &mut x, &shape, &mut rng);
        let p = pixels(&x);
        assert!((p[0] - 0.35).abs() < 1e-5 && (p[27 * 28] - 0.7).abs() < 1e-5);
    }

    #[test]
    fn a_quarter_turn_moves_the_top_row_to_the_left_column() {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut x = image(|i, _| if i == 0 { 1.0 } else { 0.0 });
        drift_example(DriftKind::Rotation, 90.0, &mut x, &[1, 28, 28], &mut rng);
        let p = pixels(&x);
        // Counter-clockwise: the top row becomes the left column.
        for i in 1..27 {
            assert!((p[i * 28] - 1.0).abs() < 1e-3, "row {i}: {}", p[i * 28]);
            assert!(p[i * 28 + 27].abs() < 1e-3);
        }
    }

    #[test]
    fn noise_has_the_configured_spread() {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut x = vec![0.0f32; 20000];
        drift_example(DriftKind::Noise, 0.5, &mut x, &[20000], &mut rng);
        let var = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.02, "{}", var.sqrt());
    }

    #[test]
    fn the_last_share_of_devices_drifts() {
        let d = Drift::new(DriftScenario::default(), 1000);
        assert_eq!(d.first_device, 800);
        assert!(d.affects(999) && !d.affects(799));
    }
}
