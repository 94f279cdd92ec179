//! Memory of an agent process serving predictions: peak resident set size
//! (`VmHWM`) of a process that loads one artifact, serves it on the Unix
//! socket endpoint and answers `--requests` single-image requests sent by a
//! client thread of the same process.
//!
//! ```sh
//! cargo run --release -p fleet-edge-agent --example serve_rss -- --artifact target/inference-bench/2nn-v1-int8.onnx [--requests 2000]
//! ```
//!
//! Also a minimal binary that uses only the inference module: its stripped
//! size is the inference cost in an agent binary (see docs/benchmarks.md).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use fleet_edge_agent::inference::endpoint::{self, Request, Response};
use fleet_edge_agent::inference::{Model, Predictor};

fn status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_else(|| "n/a".into())
}

fn call(
    stream: &mut std::os::unix::net::UnixStream,
    request: &Request,
) -> std::io::Result<Response> {
    let body = serde_json::to_vec(request)?;
    stream.write_all(&(body.len() as u32).to_le_bytes())?;
    stream.write_all(&body)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut back = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut back)?;
    Ok(serde_json::from_slice(&back)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let artifact = PathBuf::from(get("--artifact").ok_or("--artifact FILE.onnx is required")?);
    let requests: usize = get("--requests")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2000);
    println!(
        "at start: VmHWM {}, VmRSS {}",
        status("VmHWM:"),
        status("VmRSS:")
    );
    let model = Model::load_file(&artifact)?;
    let features = model.features();
    println!(
        "loaded {} ({} {} v{}, {} bytes): VmHWM {}",
        artifact.display(),
        model.meta().spec.name(),
        model.meta().variant,
        model.version(),
        model.artifact_bytes(),
        status("VmHWM:")
    );
    let predictor = Arc::new(Predictor::new(model));
    let socket = std::env::temp_dir().join(format!("fleet-serve-rss-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(async { tokio::net::UnixListener::bind(&socket) })?;
    let client_socket = socket.clone();
    let client = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut s = std::os::unix::net::UnixStream::connect(&client_socket)?;
        let mut ok = 0;
        for i in 0..requests {
            let pixels: Vec<u8> = (0..features)
                .map(|j| ((i * 31 + j * 7) % 256) as u8)
                .collect();
            let r = call(
                &mut s,
                &Request::PredictPixels {
                    pixels: vec![pixels],
                },
            )?;
            ok += usize::from(r.ok);
        }
        Ok(ok)
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = std::thread::spawn(move || {
        let r = client.join();
        let _ = done_tx.send(());
        r
    });
    rt.block_on(endpoint::serve(listener, predictor, async {
        let _ = done_rx.await;
    }))?;
    let ok = waiter
        .join()
        .map_err(|_| "client thread panicked")?
        .map_err(|_| "client panicked")??;
    let _ = std::fs::remove_file(&socket);
    println!(
        "served {ok}/{requests} requests: VmHWM {}, VmRSS {}",
        status("VmHWM:"),
        status("VmRSS:")
    );
    Ok(())
}
