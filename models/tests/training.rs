//! Training numerics: gradients against finite differences and a textbook
//! formula, optimiser steps against hand computation, determinism, FedProx.

use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::train::loss_and_gradient;
use fleet_models::{Backend, Dataset, Error, ModelSpec, TrainConfig, evaluate, train_local};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_data(n: usize, dim: usize, classes: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = (0..n * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let y = (0..n).map(|_| rng.random_range(0..classes as u8)).collect();
    Dataset::new(x, y, vec![dim], classes, vec![]).unwrap()
}

fn loss_at(spec: &ModelSpec, params: &[f32], data: &Dataset, backend: Backend) -> f64 {
    f64::from(
        loss_and_gradient(spec, params, data.view(), backend)
            .unwrap()
            .0,
    )
}

/// Central finite differences on `coords`, compared with autodiff.
fn check_gradient(spec: &ModelSpec, data: &Dataset, coords: &[usize], backend: Backend) {
    let params = spec.init_params(5);
    let (_, grad) = loss_and_gradient(spec, &params, data.view(), backend).unwrap();
    assert_eq!(grad.len(), params.len());
    let eps = 2e-3f32;
    let mut worst = 0.0f64;
    for &i in coords {
        let mut p = params.clone();
        p[i] += eps;
        let up = loss_at(spec, &p, data, backend);
        p[i] -= 2.0 * eps;
        let down = loss_at(spec, &p, data, backend);
        let fd = (up - down) / (2.0 * f64::from(eps));
        let err = (fd - f64::from(grad[i])).abs() / (1e-2 + fd.abs().max(f64::from(grad[i]).abs()));
        worst = worst.max(err);
        assert!(
            err < 2e-2,
            "{} coord {i}: finite difference {fd}, autodiff {}",
            spec.name(),
            grad[i]
        );
    }
    eprintln!(
        "{} on {backend}: worst relative error {worst:.2e}",
        spec.name()
    );
}

#[test]
fn gradients_match_finite_differences() {
    for &backend in Backend::ALL {
        let spec = ModelSpec::Mlp {
            inputs: 6,
            hidden: vec![5],
            classes: 3,
        };
        let data = random_data(8, 6, 3, 1);
        let all: Vec<usize> = (0..spec.layout().total).collect();
        check_gradient(&spec, &data, &all, backend);

        let cnn = ModelSpec::Cnn {
            channels: 1,
            height: 4,
            width: 4,
            classes: 3,
        };
        let data = random_data(4, 16, 3, 2);
        let total = cnn.layout().total;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut coords: Vec<usize> = (0..40).map(|_| rng.random_range(0..total)).collect();
        // Every tensor at least once: the first value of each entry.
        coords.extend(cnn.layout().entries.iter().map(|e| e.offset));
        check_gradient(&cnn, &data, &coords, backend);
    }
}

#[test]
fn logistic_regression_gradient_matches_the_textbook_formula() {
    // dL/dW = Xᵀ(softmax(XW + b) − Y)/n and dL/db = mean(softmax − Y), in f64.
    let (n, d, c) = (10, 7, 4);
    let spec = ModelSpec::LogReg {
        inputs: d,
        classes: c,
    };
    let data = random_data(n, d, c, 3);
    let params = spec.init_params(2);
    let (loss, grad) = loss_and_gradient(&spec, &params, data.view(), Backend::DEFAULT).unwrap();
    let (w, b) = params.split_at(d * c);
    let mut gw = vec![0.0f64; d * c];
    let mut gb = vec![0.0f64; c];
    let mut want_loss = 0.0;
    for i in 0..n {
        let x = data.example(i);
        let y = data.labels()[i] as usize;
        let z: Vec<f64> = (0..c)
            .map(|k| {
                f64::from(b[k])
                    + (0..d)
                        .map(|j| f64::from(x[j]) * f64::from(w[j * c + k]))
                        .sum::<f64>()
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        want_loss += -(z[y] - m - s.ln()) / n as f64;
        for k in 0..c {
            let p = (z[k] - m).exp() / s - if k == y { 1.0 } else { 0.0 };
            gb[k] += p / n as f64;
            for j in 0..d {
                gw[j * c + k] += f64::from(x[j]) * p / n as f64;
            }
        }
    }
    assert!(
        (f64::from(loss) - want_loss).abs() < 1e-5,
        "{loss} vs {want_loss}"
    );
    for (a, b) in grad.iter().zip(gw.iter().chain(&gb)) {
        assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn sgd_momentum_and_weight_decay_follow_the_update_rule() {
    // Two full-batch steps of logistic regression, replayed by hand:
    // g = ∇L(w) + λw;  v = m·v + g;  w ← w − η·v.
    let spec = ModelSpec::LogReg {
        inputs: 5,
        classes: 3,
    };
    let data = random_data(6, 5, 3, 4);
    let w0 = spec.init_params(8);
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 6,
        learning_rate: 0.3,
        momentum: 0.9,
        weight_decay: 0.01,
        prox_mu: 0.0,
        seed: 1,
    };
    let out = train_local(&spec, &w0, data.view(), &cfg, Backend::DEFAULT).unwrap();
    assert_eq!(out.steps, 2);
    let (m, lr, wd) = (0.9f32, 0.3f32, 0.01f32);
    let mut w = w0.clone();
    let mut v = vec![0.0f32; w.len()];
    for _ in 0..2 {
        let (_, g) = loss_and_gradient(&spec, &w, data.view(), Backend::DEFAULT).unwrap();
        for i in 0..w.len() {
            v[i] = m * v[i] + g[i] + wd * w[i];
            w[i] -= lr * v[i];
        }
    }
    for (a, b) in out.params.iter().zip(&w) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn same_seed_gives_bit_identical_training() {
    let train = embedded::load(Split::Train).unwrap();
    let idx: Vec<usize> = (0..600).collect();
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let global = spec.init_params(1);
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: 32,
            momentum: 0.5,
            seed: 77,
            ..TrainConfig::default()
        };
        let data = train
            .subset(&idx[..if spec.name() == "cnn" { 96 } else { 600 }])
            .unwrap();
        let a = train_local(&spec, &global, data, &cfg, Backend::DEFAULT).unwrap();
        let b = train_local(&spec, &global, data, &cfg, Backend::DEFAULT).unwrap();
        assert!(
            a.params
                .iter()
                .zip(&b.params)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        assert_eq!(a.mean_loss.to_bits(), b.mean_loss.to_bits());
        let c = train_local(
            &spec,
            &global,
            data,
            &TrainConfig { seed: 78, ..cfg },
            Backend::DEFAULT,
        )
        .unwrap();
        assert_ne!(a.params, c.params, "another seed, another batch order");
    }
}

#[test]
fn local_training_learns_the_embedded_data() {
    let train = embedded::load(Split::Train).unwrap();
    let test = embedded::load(Split::Test).unwrap();
    let spec = ModelSpec::fashion_2nn();
    let global = spec.init_params(0);
    let before = evaluate(&spec, &global, test.view(), Backend::DEFAULT).unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 32,
        learning_rate: 0.05,
        ..TrainConfig::default()
    };
    let out = train_local(&spec, &global, train.view(), &cfg, Backend::DEFAULT).unwrap();
    let after = evaluate(&spec, &out.params, test.view(), Backend::DEFAULT).unwrap();
    assert_eq!(out.examples, 5000);
    assert_eq!(out.steps, 2 * 157);
    assert!(
        before.accuracy < 0.3,
        "untrained accuracy {}",
        before.accuracy
    );
    assert!(after.accuracy > 0.72, "trained accuracy {}", after.accuracy);
    assert!(after.loss < before.loss);
    assert!(out.mean_loss.is_finite() && out.mean_loss < before.loss);
}

#[test]
fn fedprox_keeps_the_local_model_near_the_global_one() {
    let data = random_data(64, 10, 3, 6);
    let spec = ModelSpec::Mlp {
        inputs: 10,
        hidden: vec![8],
        classes: 3,
    };
    let global = spec.init_params(3);
    let dist = |mu: f64| {
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 8,
            learning_rate: 0.1,
            prox_mu: mu,
            ..TrainConfig::default()
        };
        let out = train_local(&spec, &global, data.view(), &cfg, Backend::DEFAULT).unwrap();
        out.delta(&global).iter().map(|d| d * d).sum::<f32>().sqrt()
    };
    let (free, prox) = (dist(0.0), dist(5.0));
    assert!(prox < 0.5 * free, "μ=5 moved {prox}, μ=0 moved {free}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let spec = ModelSpec::fashion_2nn();
    let global = spec.init_params(0);
    let wrong_dim = random_data(4, 60, 10, 0);
    let e = train_local(
        &spec,
        &global,
        wrong_dim.view(),
        &TrainConfig::default(),
        Backend::DEFAULT,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                expected: 784,
                found: 60,
                ..
            }
        ),
        "{e}"
    );
    let ok = random_data(4, 784, 10, 0);
    let e = train_local(
        &spec,
        &global[1..],
        ok.view(),
        &TrainConfig::default(),
        Backend::DEFAULT,
    )
    .unwrap_err();
    assert!(matches!(e, Error::FlatLength { .. }), "{e}");
    let e = train_local(
        &spec,
        &global,
        ok.view(),
        &TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        },
        Backend::DEFAULT,
    )
    .unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
    let e = train_local(
        &spec,
        &global,
        ok.view(),
        &TrainConfig {
            learning_rate: f64::NAN,
            ..TrainConfig::default()
        },
        Backend::DEFAULT,
    )
    .unwrap_err();
    assert!(e.to_string().contains("learning_rate"), "{e}");
    let e = train_local(
        &spec,
        &global,
        ok.subset(&[]).unwrap(),
        &TrainConfig::default(),
        Backend::DEFAULT,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no local examples"), "{e}");
    let e = evaluate(&spec, &global, wrong_dim.view(), Backend::DEFAULT).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
}

#[test]
fn logits_are_x_w_plus_b_and_agree_with_evaluation() {
    let (n, d, c) = (1203, 5, 3);
    let spec = ModelSpec::LogReg {
        inputs: d,
        classes: c,
    };
    let data = random_data(n, d, c, 8);
    let params = spec.init_params(4);
    let z = fleet_models::logits(&spec, &params, data.view(), Backend::DEFAULT).unwrap();
    assert_eq!(z.len(), n * c);
    let (w, b) = params.split_at(d * c);
    for i in [0, 999, 1000, n - 1] {
        let x = data.example(i);
        for k in 0..c {
            let want = b[k] + (0..d).map(|j| x[j] * w[j * c + k]).sum::<f32>();
            assert!((z[i * c + k] - want).abs() < 1e-5);
        }
    }
    let correct = z
        .chunks(c)
        .zip(data.labels())
        .filter(|(row, y)| fleet_models::train::argmax(row) == **y as usize)
        .count();
    let eval = evaluate(&spec, &params, data.view(), Backend::DEFAULT).unwrap();
    assert_eq!(correct as f32 / n as f32, eval.accuracy);
}
