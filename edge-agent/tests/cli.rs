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

#[test]
fn enroll_reads_its_token_from_a_file_or_standard_input() {
    use std::io::Write;
    use std::process::Stdio;

    let dir = scratch("token");
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    let state = dir.join("state");
    let enroll = |source: &[&str]| {
        let mut args = vec![
            "enroll",
            "--state",
            state.to_str().unwrap(),
            "--coordinator",
            "localhost:7400",
            "--ca",
            "/nonexistent/ca.crt",
        ];
        args.extend_from_slice(source);
        agent(&args)
    };
    let from_file = ["--token-file", token.to_str().unwrap()];

    // An empty file is refused before anything else, saying what to put there.
    std::fs::write(&token, " \n").unwrap();
    let o = enroll(&from_file);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds no enrollment token"), "{err}");
    assert!(err.contains("coordinator token create"), "{err}");

    // A token is taken: the next complaint is the CA certificate.
    std::fs::write(&token, "0123abcd\n").unwrap();
    let o = enroll(&from_file);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/ca.crt"), "{err}");

    let o = enroll(&["--token-file", "/nonexistent/token"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot read the enrollment token from /nonexistent/token"),
        "{err}"
    );

    // `-`: standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["enroll", "--state", state.to_str().unwrap()])
        .args([
            "--coordinator",
            "localhost:7400",
            "--ca",
            "/nonexistent/ca.crt",
        ])
        .args(["--token-file", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("standard input holds no enrollment token"),
        "{err}"
    );

    // One of --token and --token-file, not both.
    let o = enroll(&[
        "--token",
        "0123abcd",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    let o = enroll(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--token-file"));
    assert!(!state.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
