//! Where a CNN training step spends its time on burn's CPU backend: each
//! layer's forward pass alone, the whole forward pass, and forward plus
//! backward, on one thread, batch 32.
//!
//! ```sh
//! cargo run --release -p fleet-models --example cnn_profile
//! ```

use std::time::Instant;

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{Distribution, Tensor};
use fleet_models::Backend;

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(f());
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for &backend in Backend::ALL {
            let dev = backend.device();
            let ad = backend.autodiff_device();
            let conv = |cin: usize, cout: usize, d: &burn::tensor::Device| Conv2d {
                weight: Param::from_tensor(Tensor::random(
                    [cout, cin, 5, 5],
                    Distribution::Normal(0.0, 0.1),
                    d,
                )),
                bias: Some(Param::from_tensor(Tensor::zeros([cout], d))),
                stride: [1, 1],
                kernel_size: [5, 5],
                dilation: [1, 1],
                groups: 1,
                padding: PaddingConfig2d::Explicit(2, 2, 2, 2),
            };
            let n = 32;
            let reps = if backend == Backend::NdArray { 2 } else { 10 };
            let x0: Tensor<4> =
                Tensor::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), &dev);
            let x1: Tensor<4> =
                Tensor::random([n, 32, 14, 14], Distribution::Normal(0.0, 1.0), &dev);
            let (c0, c1) = (conv(1, 32, &dev), conv(32, 64, &dev));
            let w2: Tensor<2> = Tensor::random([3136, 512], Distribution::Normal(0.0, 0.01), &dev);
            let h: Tensor<2> = Tensor::random([n, 3136], Distribution::Normal(0.0, 1.0), &dev);
            let fwd0 = time(reps, || c0.forward(x0.clone()).into_data());
            let fwd1 = time(reps, || c1.forward(x1.clone()).into_data());
            let dense = time(reps, || h.clone().matmul(w2.clone()).into_data());
            // The same convolutions with gradients: forward + backward.
            let (a0, a1) = (conv(1, 32, &ad), conv(32, 64, &ad));
            let x0a = x0.clone().autodiff();
            let x1a = x1.clone().autodiff().require_grad();
            let bwd0 = time(reps, || a0.forward(x0a.clone()).sum().backward());
            let bwd1 = time(reps, || a1.forward(x1a.clone()).sum().backward());
            println!("backend {backend}, batch {n}, one thread (ms):");
            println!("| op | forward | forward + backward |");
            println!("| --- | --- | --- |");
            println!("| conv0 1→32, 28×28 | {fwd0:.2} | {bwd0:.2} |");
            println!("| conv1 32→64, 14×14 | {fwd1:.2} | {bwd1:.2} |");
            println!("| dense 3136→512 (matmul) | {dense:.2} | |");
        }
    });
}
