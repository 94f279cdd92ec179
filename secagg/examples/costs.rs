//! What secure aggregation costs: per-device compute and bytes, and the
//! server's unmasking time, against the number of devices and the model
//! size. Every device runs the real protocol in this process; one in
//! twenty drops out after sharing its keys (so the server also
//! reconstructs keys and removes their masks).
//!
//! ```sh
//! cargo run --release -p fleet-secagg --example costs
//! cargo run --release -p fleet-secagg --example costs -- --devices 10,100 --lengths 199210
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use fleet_secagg::pki::{SimPki, SimSigner};
use fleet_secagg::quantise::Quantiser;
use fleet_secagg::{Context, Device, DeviceMessage, Output, Params, Server, ServerMessage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &[usize]) -> Vec<usize> {
    arg(name).map_or_else(
        || default.to_vec(),
        |s| {
            s.split(',')
                .map(|x| x.trim().parse().expect("a number"))
                .collect()
        },
    )
}

fn size<T: serde::Serialize>(m: &T) -> usize {
    postcard::to_allocvec(m).map_or(0, |v| v.len())
}

struct Row {
    n: usize,
    dim: usize,
    degree: u16,
    quantise_ms: f64,
    device_ms: f64,
    up_bytes: f64,
    down_bytes: f64,
    server_ms: f64,
    unmask_ms: f64,
    survivors: usize,
}

fn run(n: usize, dim: usize) -> Row {
    let log = usize::BITS - (n.max(2) - 1).leading_zeros();
    let degree = ((2 * log as usize).clamp(4, 254).min(n - 1) as u16).div_ceil(2) * 2;
    let threshold = degree / 2 + 1;
    let q = Quantiser::plan(dim, 1.0, 1.0, n * 9 / 10, n, 7).expect("quantiser");
    let ctx = Context {
        task: 1,
        round: 1,
        attempt: 0,
        params: Params {
            threshold,
            degree,
            min_survivors: (n * 8 / 10).max(2) as u32,
            length: q.padded,
        },
    };
    let mut rng = ChaCha20Rng::seed_from_u64(n as u64);
    let pki = SimPki::new(1);
    let mut server = Server::new(ctx, 0..n as u64, 0, 60_000, 3).expect("server");
    let mut devices = BTreeMap::new();
    let mut queue = VecDeque::new();
    let mut device_s = 0.0;
    let mut server_s = 0.0;
    let mut quantise_s = 0.0;
    let (mut up, mut down) = (0usize, 0usize);
    let update: Vec<f32> = (0..dim).map(|_| rng.random_range(-0.01..0.01)).collect();
    for d in 0..n as u64 {
        let t = Instant::now();
        let (dev, ad) = Device::new(d, ctx, &SimSigner::new(1, d), &mut rng).expect("device");
        device_s += t.elapsed().as_secs_f64();
        up += size(&ad);
        devices.insert(d, dev);
        let t = Instant::now();
        queue.extend(server.receive(d, ad, 0));
        server_s += t.elapsed().as_secs_f64();
    }
    let mut unmask_s = 0.0;
    let survivors;
    loop {
        let Some(out) = queue.pop_front() else {
            panic!("the round stalled");
        };
        match out {
            Output::Send(d, msg) => {
                down += size(&msg);
                // One device in twenty leaves after sharing.
                if d % 20 == 7 && matches!(msg, ServerMessage::Shares(_)) {
                    let t = Instant::now();
                    queue.extend(server.drop_out(d, 0));
                    server_s += t.elapsed().as_secs_f64();
                    continue;
                }
                let dev = devices.get_mut(&d).expect("a device");
                let t = Instant::now();
                let answer = match msg {
                    ServerMessage::Neighbours(ads) => dev.share(&ads, &pki, &mut rng),
                    ServerMessage::Shares(s) => {
                        let tq = Instant::now();
                        let input = q.encode(&update, &mut rng).expect("encode");
                        quantise_s += tq.elapsed().as_secs_f64();
                        dev.mask(&s, input)
                    }
                    ServerMessage::Unmask { survivors, dropped } => {
                        dev.reveal(&survivors, &dropped)
                    }
                }
                .expect("an honest device answers");
                device_s += t.elapsed().as_secs_f64();
                up += size(&answer);
                let last = matches!(answer, DeviceMessage::Reveal(_));
                let t = Instant::now();
                let more = server.receive(d, answer, 0);
                let el = t.elapsed().as_secs_f64();
                server_s += el;
                if last && more.iter().any(|o| matches!(o, Output::Finished { .. })) {
                    unmask_s = el;
                }
                queue.extend(more);
            }
            Output::Finished { survivors: s, .. } => {
                survivors = s.len();
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    Row {
        n,
        dim,
        degree,
        quantise_ms: quantise_s * 1e3 / survivors as f64,
        device_ms: (device_s - quantise_s) * 1e3 / n as f64,
        up_bytes: up as f64 / n as f64,
        down_bytes: down as f64 / n as f64,
        server_ms: server_s * 1e3,
        unmask_ms: unmask_s * 1e3,
        survivors,
    }
}

fn main() {
    let ns = list("--devices", &[10, 100, 1000]);
    // The 2NN and the CNN of McMahan et al. on Fashion-MNIST.
    let dims = list("--lengths", &[199_210, 1_663_370]);
    println!(
        "| devices | parameters | degree | survivors | quantise ms/device | protocol ms/device | up KiB/device | down KiB/device | server ms total | unmasking ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &dim in &dims {
        for &n in &ns {
            let r = run(n, dim);
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} |",
                r.n,
                r.dim,
                r.degree,
                r.survivors,
                r.quantise_ms,
                r.device_ms,
                r.up_bytes / 1024.0,
                r.down_bytes / 1024.0,
                r.server_ms,
                r.unmask_ms
            );
        }
    }
}
