//! Cost of drift summaries on the prediction path.
//!
//! Exports the 2NN (float and int8, calibrated on the embedded training
//! images), fits the drift sketch on the same images, then times
//! `Predictor::predict` on test images with no observer and with the
//! [`DriftObserver`], in alternating rounds so that both see the same
//! machine state, at batch 1 and 64, on one thread. Prints the median time
//! per prediction of each and the overhead, and the encoded size of a
//! summary.
//!
//! ```sh
//! cargo run --release -p fleet-edge-agent --example drift_cost -- [--seconds 1]
//! ```

use std::time::Instant;

use fleet_drift::sketch::FitConfig;
use fleet_drift::{SketchSpec, Summary};
use fleet_edge_agent::drift::DriftObserver;
use fleet_edge_agent::inference::{Model, Observer, Predictor};
use fleet_models::ModelSpec;
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::export::{self, Artifact, ExportInfo, QuantConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Seconds per prediction of `p` on `x` (`n` examples), over about `seconds`.
fn per_prediction<O: Observer>(p: &Predictor<O>, x: &[f32], n: usize, seconds: f64) -> Res<f64> {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        std::hint::black_box(p.predict(x)?);
        calls += 1;
    }
    Ok(start.elapsed().as_secs_f64() / (calls as f64 * n as f64))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1.0);
    let train = embedded::load(Split::Train)?;
    let test = embedded::load(Split::Test)?;
    let spec = ModelSpec::fashion_2nn();
    let params = spec.init_params(1);
    let info = ExportInfo::fashion_mnist(1);
    let sketch = SketchSpec::fit(
        train.dim(),
        train.classes(),
        (0..2000).map(|i| train.example(i)),
        FitConfig::default(),
    )?;
    println!(
        "drift sketch: {} features × {} bins, {} projections of {} taps",
        sketch.features(),
        sketch.bins,
        sketch.projections,
        sketch.taps
    );
    println!(
        "{:<8} {:>6} {:>14} {:>16} {:>9} {:>18} {:>9}",
        "model", "batch", "plain µs/pred", "every pred µs", "overhead", "1 in 8 µs", "overhead"
    );
    let mut summary: Option<Summary> = None;
    let variants = [
        ("float", export::export_float(&spec, &params, &info)?),
        (
            "int8",
            export::quantize(&spec, &params, &info, train.view(), &QuantConfig::default())?,
        ),
    ];
    for (name, artifact) in variants {
        let load = |a: &Artifact| Model::from_artifact(a.clone());
        let plain = Predictor::new(load(&artifact)?);
        let observer = DriftObserver::new();
        observer.set_spec(1, sketch.clone())?;
        let observed = Predictor::with_observer(load(&artifact)?, observer);
        let sampler = DriftObserver::sampling(8);
        sampler.set_spec(1, sketch.clone())?;
        let sampled = Predictor::with_observer(load(&artifact)?, sampler);
        for batch in [1usize, 64] {
            let x = &test.features()[..batch * test.dim()];
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            // Alternate so that all three see the same conditions.
            for _ in 0..7 {
                a.push(per_prediction(&plain, x, batch, seconds / 7.0)?);
                b.push(per_prediction(&observed, x, batch, seconds / 7.0)?);
                c.push(per_prediction(&sampled, x, batch, seconds / 7.0)?);
            }
            let (a, b, c) = (median(&mut a), median(&mut b), median(&mut c));
            println!(
                "{name:<8} {batch:>6} {:>14.2} {:>16.2} {:>8.1}% {:>18.2} {:>8.1}%",
                a * 1e6,
                b * 1e6,
                100.0 * (b - a) / a,
                c * 1e6,
                100.0 * (c - a) / a
            );
        }
        if let Some((_, s)) = observed.observer().take() {
            summary = Some(s);
        }
    }
    // The observer's own work, without inference: the same 64 test images and logits.
    {
        let model = Model::from_artifact(export::export_float(&spec, &params, &info)?)?;
        let x = &test.features()[..64 * test.dim()];
        let logits = model.predict(x)?.logits;
        let observer = DriftObserver::new();
        observer.set_spec(1, sketch.clone())?;
        let o = fleet_edge_agent::inference::Observation {
            version: 1,
            features: test.dim(),
            inputs: x,
            classes: 10,
            logits: &logits,
            first_id: 1,
        };
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            observer.observe(std::hint::black_box(&o));
            calls += 1;
        }
        println!(
            "observer alone: {:.3} µs per prediction",
            start.elapsed().as_secs_f64() * 1e6 / (calls as f64 * 64.0)
        );
    }
    if let Some(s) = summary {
        let bytes = postcard::to_allocvec(&s)?;
        println!(
            "one window's summary: {} bytes (postcard), {} predictions",
            bytes.len(),
            s.predictions()
        );
    }
    Ok(())
}
