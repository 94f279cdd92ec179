//! Replays every committed fuzz corpus and regression input through the
//! fuzz target bodies (`fleet_e2e::fuzz`), on the stable toolchain.
//!
//! For each target, `fuzz/corpus/<target>/` must exist and hold at least one
//! input, so that a renamed or lost corpus fails here instead of passing
//! silently. `fuzz/regressions/<target>/` (crash inputs whose bug is fixed)
//! is replayed when present; `fuzz/regressions-open/<target>/` (crash inputs
//! whose bug is not fixed yet) is not.
//!
//! `FLEET_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_replay write_seeds --
//! --ignored` writes the seed inputs (`fleet_e2e::fuzz::seeds`) to
//! `fuzz/seeds/<target>/`, which `cargo fuzz cmin` merges into the corpora.

use std::path::{Path, PathBuf};
use std::time::Instant;

use fleet_e2e::fuzz::{TARGETS, seeds};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("fuzz")
}

/// The files of `dir`, sorted (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, body: fn(&[u8]), files: &[PathBuf]) {
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let r = std::panic::catch_unwind(|| body(&data));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{target}: input {} fails: {msg}", f.display());
        }
    }
}

#[test]
fn every_corpus_and_regression_input_replays() {
    let root = fuzz_dir();
    let mut missing = Vec::new();
    for (target, body) in TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{target}.rs is missing"
        );
        let corpus = inputs(&root.join("corpus").join(target));
        if corpus.is_empty() {
            missing.push(target);
            continue;
        }
        let regressions = inputs(&root.join("regressions").join(target));
        let start = Instant::now();
        replay(target, body, &corpus);
        replay(target, body, &regressions);
        println!(
            "{target}: replayed {} corpus and {} regression inputs in {:.2?}",
            corpus.len(),
            regressions.len(),
            start.elapsed()
        );
    }
    assert!(
        missing.is_empty(),
        "fuzz/corpus/<target>/ missing or empty for {missing:?}"
    );
}

#[test]
fn every_seed_input_passes() {
    for (target, body) in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (name, data) in seeds {
            let r = std::panic::catch_unwind(|| body(&data));
            assert!(r.is_ok(), "{target}: seed {name} fails");
            // Seeds are valid inputs: they reach past the parsers.
            match target {
                "onnx_model" => {
                    fleet_edge_agent::inference::Model::load(data, None)
                        .unwrap_or_else(|e| panic!("seed {name} does not load: {e}"));
                }
                "fleet_file" => {
                    let text = String::from_utf8(data).expect("UTF-8");
                    fleet_sim::fleet::Fleet::from_toml(&text)
                        .unwrap_or_else(|e| panic!("seed {name} is refused: {e}"));
                }
                _ => {}
            }
        }
    }
}

#[test]
#[ignore = "writes fuzz/seeds/; run by hand before cmin"]
fn write_seeds() {
    if std::env::var_os("FLEET_FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, data) in seeds(target) {
            std::fs::write(dir.join(name), data).expect("seed file");
        }
    }
}
