//! The CA key encrypted at rest, through the command line: `coordinator
//! serve` refuses to start without the passphrase (saying how to give it),
//! starts with it from a file or from a systemd credential, and the CA it
//! unlocked signs a new device's certificate.

use fleet_e2e::{Proc, binary, free_udp_port, run, scratch};

#[test]
fn an_encrypted_ca_key_needs_its_passphrase_to_serve_and_then_enrolls() {
    let dir = scratch("ca-key");
    let home = dir.join("home");
    let pass = dir.join("passphrase");
    std::fs::write(&pass, "a passphrase kept elsewhere\n").unwrap();
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let c = binary("coordinator");
    let home_s = home.to_str().unwrap();
    fleet_e2e::init_home(
        &home,
        &addr,
        &[
            "--metrics",
            "none",
            "--ca-passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    assert_eq!(
        run(&c, &["ca-key", "status", "--dir", home_s]).trim(),
        "encrypted"
    );

    // Without the passphrase: it stops at once, saying how to give it.
    let out = std::process::Command::new(&c)
        .args(["serve", "--dir", home_s])
        .env_remove("FLEET_CA_PASSPHRASE_FILE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--ca-passphrase-file"), "{stderr}");

    // From a systemd credential (LoadCredential=ca-passphrase:FILE).
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::copy(&pass, credentials.join("ca-passphrase")).unwrap();
    let log = dir.join("coordinator.log");
    let mut serving = Proc::spawn_with_env(
        &c,
        &["serve", "--dir", home_s],
        &log,
        &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())],
    );
    fleet_e2e::wait_listening(&home);

    // The CA it unlocked signs a new device's certificate.
    let token = run(&c, &["token", "create", "--dir", home_s]);
    let state = dir.join("agent");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    run(
        &binary("edge-agent"),
        &[
            "enroll",
            "--state",
            state.to_str().unwrap(),
            "--coordinator",
            &addr,
            "--server-name",
            "localhost",
            "--ca",
            home.join("ca.crt").to_str().unwrap(),
            "--token",
            token.trim(),
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert!(state.join("device.crt").is_file());
    serving.kill();

    // From a file named on the command line, after a change of passphrase.
    let new = dir.join("new-passphrase");
    std::fs::write(&new, "another passphrase, longer").unwrap();
    run(
        &c,
        &[
            "ca-key",
            "encrypt",
            "--dir",
            home_s,
            "--ca-passphrase-file",
            pass.to_str().unwrap(),
            "--new-passphrase-file",
            new.to_str().unwrap(),
        ],
    );
    let old = std::process::Command::new(&c)
        .args(["serve", "--dir", home_s, "--ca-passphrase-file"])
        .arg(&pass)
        .output()
        .unwrap();
    assert!(
        !old.status.success(),
        "the old passphrase still opens the key"
    );
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("wrong passphrase"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let _serving = Proc::spawn(
        &c,
        &[
            "serve",
            "--dir",
            home_s,
            "--ca-passphrase-file",
            new.to_str().unwrap(),
        ],
        &log,
    );
    fleet_e2e::wait_listening(&home);
}
