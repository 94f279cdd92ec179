//! The `edge-agent` command line: data preparation and the messages a
//! person gets when something is missing or wrong.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .expect("edge-agent runs")
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-agent-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn data_split_writes_one_loadable_directory_per_device() {
    let out = scratch("split");
    let o = agent(&[
        "data",
        "split",
        "--out",
        out.to_str().unwrap(),
        "--devices",
        "3",
        "--partition",
        "iid",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut total = 0;
    for k in 0..3 {
        let d = fleet_models::data::device::load(&out.join(format!("device-{k}"))).unwrap();
        total += d.len();
    }
    assert_eq!(
        total, 5_000,
        "the embedded training set, split without loss"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn mistakes_get_a_message_that_says_what_to_do() {
    let state = scratch("state");
    let o = agent(&["run", "--state", state.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("run `edge-agent enroll` first"), "{err}");

    let o = agent(&[
        "data",
        "split",
        "--out",
        "x",
        "--devices",
        "2",
        "--partition",
        "dirichlet:-1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dirichlet needs a concentration > 0"), "{err}");

    let o = agent(&["predict", "--model", "/nonexistent.onnx", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nonexistent.onnx"));
}
