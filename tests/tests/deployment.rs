//! Deployment of inference artifacts, end to end: the coordinator builds the
//! float and int8 artifacts of every model version (again after a crash
//! before the build), ships the variant the task chose, and agents fetch,
//! check, persist and hot-swap it and serve it on their Unix socket. Bad
//! artifacts (truncated, wrong SHA-256, metadata that contradicts the
//! announcement, a damaged persisted file, a damaged stored object on the
//! coordinator) are refused and the previous model keeps serving. The
//! coordinator's home, the agent's state and its socket are private to
//! their owner. Real QUIC, real TLS, real tract.

use std::path::{Path, PathBuf};

use fleet_e2e::{
    InProcess, ProcessFleet, ask_socket, device_config, scratch, small_task, wait_for,
};
use fleet_edge_agent::deploy::{Checked, DeployError, Deployer, Serving};
use fleet_edge_agent::inference::Model;
use fleet_edge_agent::inference::endpoint::{Request, Response};
use fleet_models::ModelSpec;
use fleet_models::data::{embedded, fashion::Split};
use fleet_models::export::Variant;
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, Deployment};
use fleet_protocol::stream::{recv, send};
use fleet_protocol::task::TaskSpec;
use fleet_protocol::{MAX_FRAME, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION};

/// The first `n` images of the embedded test split, as pixel rows.
fn test_pixels(n: usize) -> Vec<Vec<u8>> {
    let (images, _) = embedded::raw(Split::Test).unwrap();
    images
        .data
        .chunks(784)
        .take(n)
        .map(<[u8]>::to_vec)
        .collect()
}

/// A model version's artifacts from `models list --json`: (variant, id, size).
fn artifacts(fleet: &ProcessFleet, model: &str) -> Vec<(String, Option<String>, Option<u64>)> {
    let models = fleet.admin_json(&["models", "list"]);
    let m = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .unwrap_or_else(|| panic!("model {model} not listed: {models}"));
    m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["variant"].as_str().unwrap().to_string(),
                a["id"].as_str().map(String::from),
                a["size"].as_u64(),
            )
        })
        .collect()
}

/// Waits until both artifacts of `model` are built; returns (float id, int8 id).
fn built(fleet: &ProcessFleet, model: &str) -> (String, String) {
    wait_for(120, "both artifacts to be built", || {
        let a = artifacts(fleet, model);
        let id = |v: &str| {
            a.iter()
                .find(|(variant, ..)| variant == v)
                .and_then(|(_, id, _)| id.clone())
        };
        Some((id("float")?, id("int8")?))
    })
}

/// The permission bits of `path`.
#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn info(socket: &Path) -> Option<Response> {
    ask_socket(socket, &Request::Info)
}

/// Waits until the agent on `socket` serves the artifact `sha256`.
fn wait_serving(socket: &Path, sha256: &str, what: &str) -> Response {
    wait_for(90, what, || {
        info(socket).filter(|r| r.info.as_ref().is_some_and(|i| i.sha256 == sha256))
    })
}

#[test]
fn a_closed_round_is_deployed_as_int8_and_served_on_the_agents_sockets() {
    let mut fleet = ProcessFleet::new("deployment", 2, "embedded");
    let sockets: Vec<PathBuf> = (0..2)
        .map(|k| fleet.dir.join(format!("agent-{k}.sock")))
        .collect();
    for (k, socket) in sockets.iter().enumerate() {
        fleet.start_agent(
            k,
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--deployment-check-secs",
                "1",
            ],
        );
    }
    // Nothing deployed yet: the socket answers, with a clear error.
    for socket in &sockets {
        let r = wait_for(30, "the agent's socket", || info(socket));
        let e = r.error.expect("an error before any deployment");
        assert!(!r.ok && e.kind == "no_model", "{e:?}");
        assert!(e.message.contains("coordinator models deploy"), "{e:?}");
    }

    let out = fleet.create_task("deploy", 1, 1, &["--report-deadline", "120"]);
    assert!(out.contains("task 1 created"), "{out}");
    fleet.admin(&["tasks", "start", "1"]);
    fleet.wait_finished(1, 300);
    let rounds = fleet.admin_json(&["rounds", "1"]);
    let model = rounds[0]["model"].as_str().unwrap().to_string();
    let (float_id, int8_id) = built(&fleet, &model);
    let sizes: Vec<u64> = artifacts(&fleet, &model)
        .iter()
        .map(|a| a.2.unwrap())
        .collect();
    assert!(sizes[0] > 3 * sizes[1], "float then int8 sizes: {sizes:?}");
    let listing = fleet.admin(&["models", "list", "--task", "1"]);
    assert!(
        listing.contains(&int8_id[..12]) && listing.contains(&float_id[..12]),
        "{listing}"
    );

    // Deploy: every agent fetches the int8 artifact and serves it.
    let out = fleet.admin(&["models", "deploy", &model[..12]]);
    assert!(out.contains("deployed as version 1"), "{out}");
    let artifact = std::fs::read(fleet.home.join("objects").join(&int8_id)).unwrap();
    let local = Model::load(artifact, Some(&int8_id)).unwrap();
    let pixels = test_pixels(5);
    for socket in &sockets {
        let r = wait_serving(socket, &int8_id, "the agent to serve the int8 artifact");
        let i = r.info.unwrap();
        assert_eq!((r.version, i.variant.as_str()), (Some(1), "int8"));
        let answer = ask_socket(
            socket,
            &Request::PredictPixels {
                pixels: pixels.clone(),
            },
        )
        .unwrap();
        assert!(answer.ok, "{answer:?}");
        let predictions = answer.predictions.unwrap();
        let x: Vec<f32> = local.normalize_pixels(&pixels.concat()).unwrap();
        let expected = local.predict(&x).unwrap();
        for (k, p) in predictions.iter().enumerate() {
            assert_eq!(p.logits, expected.row(k), "example {k}");
            assert_eq!(p.label, i.labels[p.class]);
        }
    }
    let log = std::fs::read_to_string(fleet.dir.join("agent-0.log")).unwrap();
    assert!(log.contains("now serving model version 1"), "{log}");
    let persisted = fleet
        .dir
        .join("agent-0/deployment")
        .join(format!("{int8_id}.onnx"));
    assert!(persisted.is_file(), "{}", persisted.display());

    // After a round and a deployment, what other local users could read
    // of the coordinator's home (CA key, database of raw updates) and of
    // an agent's state (device key, pending update) and socket: nothing.
    #[cfg(unix)]
    {
        let home: &Path = &fleet.home;
        let state = fleet.dir.join("agent-0");
        assert_eq!(mode(home), 0o700, "the coordinator's home");
        assert_eq!(mode(&state), 0o700, "the agent's state directory");
        assert_eq!(mode(&home.join("objects")), 0o700, "the object directory");
        for secret in [
            "ca.key",
            "server.key",
            "admin.key",
            "coordinator.db",
            "coordinator.db-wal",
        ] {
            assert_eq!(mode(&home.join(secret)), 0o600, "{secret}");
        }
        for secret in ["device.key", "agent.json"] {
            assert_eq!(mode(&state.join(secret)), 0o600, "{secret}");
        }
        assert_eq!(mode(&sockets[0]), 0o600, "the inference socket");
    }

    // A crash between a round's close and the build: the artifacts' rows
    // and files are gone. While the coordinator is down, a restarted agent
    // serves its persisted artifact at once.
    fleet.coordinator.take().unwrap().kill();
    {
        let db = rusqlite::Connection::open(fleet.home.join("coordinator.db")).unwrap();
        // Two model versions (the initial one and round 1's), two variants each.
        assert_eq!(db.execute("DELETE FROM artifacts", []).unwrap(), 4);
    }
    for id in [&float_id, &int8_id] {
        std::fs::remove_file(fleet.home.join("objects").join(id)).unwrap();
    }
    fleet.agents[0].take().unwrap().kill();
    fleet.start_agent(
        0,
        &[
            "--socket",
            sockets[0].to_str().unwrap(),
            "--deployment-check-secs",
            "1",
        ],
    );
    wait_serving(
        &sockets[0],
        &int8_id,
        "the restarted agent to serve its persisted artifact",
    );
    // The restarted coordinator builds what is missing: the same bytes again.
    fleet.start_coordinator();
    assert_eq!(built(&fleet, &model), (float_id.clone(), int8_id.clone()));
    let initial = fleet.admin_json(&["models", "list", "--task", "1"]);
    let initial = initial
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["round"] == 0)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    built(&fleet, &initial);

    // A task that chose the float variant: its model reaches the agents as
    // float, hot-swapped, the int8 version kept for rollback.
    let out = fleet.create_task("float", 1, 1, &["--variant", "float", "--seed", "9"]);
    assert!(out.contains("task 2 created"), "{out}");
    let models = fleet.admin_json(&["models", "list", "--task", "2"]);
    let model2 = models[0]["id"].as_str().unwrap().to_string();
    let (float2, _) = built(&fleet, &model2);
    fleet.admin(&["models", "deploy", &model2[..12]]);
    for socket in &sockets {
        let r = wait_serving(socket, &float2, "the agent to serve the float artifact");
        let i = r.info.unwrap();
        assert_eq!((r.version, i.variant.as_str()), (Some(0), "float"));
        assert_eq!(i.previous_version, Some(1));
    }
}

fn task(name: &str, spec: ModelSpec, seed: u64) -> TaskSpec {
    TaskSpec {
        seed,
        variant: Variant::Int8,
        ..small_task(name, &spec)
    }
}

/// Creates a task and deploys its initial model; returns the model's id.
async fn create_and_deploy(
    admin: &mut fleet_coordinator::cli::admin::AdminClient,
    spec: TaskSpec,
) -> String {
    let AdminResponse::Done { id: Some(task), .. } = admin
        .call(&AdminRequest::CreateTask(Box::new(spec)))
        .await
        .unwrap()
    else {
        panic!("task not created")
    };
    let AdminResponse::Models(models) = admin
        .call(&AdminRequest::ListModels { task: Some(task) })
        .await
        .unwrap()
    else {
        panic!("no models")
    };
    let id = models[0].id.clone();
    let reply = admin
        .call(&AdminRequest::Deploy { model: id.clone() })
        .await
        .unwrap();
    assert!(matches!(reply, AdminResponse::Done { .. }), "{reply:?}");
    id
}

/// The deployment and its artifact's bytes, through the device protocol.
async fn fetch_deployment(endpoint: &quinn::Endpoint, c: &InProcess) -> (Deployment, Vec<u8>) {
    let conn = endpoint
        .connect(c.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    let mut ask = async |m: AgentMessage| {
        send(&mut tx, &m).await.unwrap();
        recv::<CoordinatorMessage>(&mut rx, MAX_FRAME)
            .await
            .unwrap()
            .unwrap()
    };
    ask(AgentMessage::Hello {
        version: PROTOCOL_VERSION,
        min_version: MIN_SUPPORTED_VERSION,
        software: "test".into(),
    })
    .await;
    let CoordinatorMessage::Deployment(Some(d)) = ask(AgentMessage::GetDeployment).await else {
        panic!("no deployment")
    };
    let mut bytes = Vec::new();
    let mut reply = ask(AgentMessage::Fetch {
        object: d.artifact.object.id,
        offset: 0,
    })
    .await;
    loop {
        let CoordinatorMessage::Chunk { data, total, .. } = reply else {
            panic!("{reply:?}")
        };
        bytes.extend(data);
        if bytes.len() as u64 == total {
            break;
        }
        reply = recv::<CoordinatorMessage>(&mut rx, MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
    }
    conn.close(0u32.into(), b"done");
    (d, bytes)
}

fn serving_sha(serving: &Serving) -> Option<String> {
    serving
        .predictor()
        .map(|p| p.current().sha256().to_string())
}

#[tokio::test(flavor = "current_thread")]
async fn bad_artifacts_are_refused_and_the_previous_model_keeps_serving() {
    let dir = scratch("deploy-bad");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(device_config(&state));
    let pixels = test_pixels(3).concat();

    // The first deployment: the int8 artifact of a 2NN is installed.
    let serving = Serving::new();
    let mut deployer = Deployer::new(&state, serving.clone());
    assert!(serving.predictor().is_none());
    create_and_deploy(&mut admin, task("a", ModelSpec::fashion_2nn(), 1)).await;
    let checked = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap();
    assert!(
        matches!(
            checked,
            Checked::Installed {
                to: 0,
                from: None,
                ..
            }
        ),
        "{checked:?}"
    );
    let first = serving_sha(&serving).unwrap();
    assert_eq!(
        deployer
            .check(&endpoint, c.addr, "localhost")
            .await
            .unwrap(),
        Checked::Unchanged
    );

    // A second model is deployed; its real bytes, damaged, are refused.
    create_and_deploy(&mut admin, task("b", ModelSpec::fashion_logreg(), 2)).await;
    let (d, bytes) = fetch_deployment(&endpoint, &c).await;
    assert_eq!(d.artifact.variant, Variant::Int8);
    let expect_refused = |r: Result<Checked, DeployError>, what: &str, words: &[&str]| {
        let e = r.expect_err(what);
        let text = e.to_string();
        assert!(matches!(e, DeployError::Download(_)), "{what}: {text}");
        for w in words {
            assert!(text.contains(w), "{what}: {text}");
        }
        assert!(text.contains("previous model keeps serving"), "{text}");
    };
    let truncated = bytes[..bytes.len() / 2].to_vec();
    expect_refused(
        deployer.accept(d.clone(), truncated).await,
        "truncated",
        &["truncated", &bytes.len().to_string()],
    );
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    expect_refused(
        deployer.accept(d.clone(), flipped).await,
        "hash mismatch",
        &["SHA-256 mismatch"],
    );
    assert_eq!(serving_sha(&serving).as_deref(), Some(first.as_str()));
    let p = serving.predictor().unwrap();
    assert_eq!(p.predict_pixels(&pixels).unwrap().len(), 3);
    assert_eq!(p.versions(), (0, None));
    // The damaged attempts left no file behind; the good artifact installs.
    let checked = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap();
    assert!(
        matches!(checked, Checked::Installed { from: Some(0), .. }),
        "{checked:?}"
    );
    assert_eq!(
        serving_sha(&serving),
        Some(d.artifact.object.id.to_string())
    );
    assert!(
        p.versions().1.is_some(),
        "the previous model is kept for rollback"
    );
    let files: Vec<_> = std::fs::read_dir(deployer.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "current.json and one artifact: {files:?}");

    // Intact bytes whose metadata contradicts the announcement: refused,
    // and not fetched again.
    let other = scratch("deploy-bad-meta");
    let other_state = fleet_edge_agent::state::StateDir::at(&other);
    let serving2 = Serving::new();
    let mut strict = Deployer::new(&other_state, serving2.clone());
    let mut lie = d.clone();
    lie.artifact.variant = Variant::Float;
    let e = strict.accept(lie.clone(), bytes.clone()).await.unwrap_err();
    assert!(matches!(e, DeployError::Artifact(_)), "{e}");
    assert!(
        e.to_string().contains("announced logreg float version 0"),
        "{e}"
    );
    assert!(!strict.wants(&lie) && serving2.predictor().is_none());

    // A damaged persisted artifact: refused at start, removed, fetched again.
    let persisted = deployer
        .dir()
        .join(format!("{}.onnx", d.artifact.object.id));
    let on_disk = std::fs::read(&persisted).unwrap();
    std::fs::write(&persisted, &on_disk[..on_disk.len() - 100]).unwrap();
    let serving3 = Serving::new();
    let mut restarted = Deployer::new(&state, serving3.clone());
    let e = restarted.restore().unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains("fetched again"),
        "{e}"
    );
    assert!(serving3.predictor().is_none() && !persisted.exists());
    let checked = restarted
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap();
    assert!(matches!(checked, Checked::Installed { .. }), "{checked:?}");
    let serving4 = Serving::new();
    assert_eq!(
        Deployer::new(&state, serving4.clone()).restore().unwrap(),
        Some(0)
    );
    assert_eq!(
        serving_sha(&serving4),
        Some(d.artifact.object.id.to_string())
    );

    // A damaged artifact in the coordinator's store: the device is told,
    // the coordinator keeps serving and builds it again.
    let stored = c
        .home
        .dir()
        .join("objects")
        .join(d.artifact.object.id.to_string());
    std::fs::write(&stored, b"damaged").unwrap();
    let fresh = scratch("deploy-bad-store");
    let mut late = Deployer::new(
        &fleet_edge_agent::state::StateDir::at(&fresh),
        Serving::new(),
    );
    let e = late
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("being built again"), "{e}");
    let mut installed = false;
    // Up to 120 s for the rebuild: generous for a loaded machine.
    for _ in 0..600 {
        if let Ok(Checked::Installed { .. }) = late.check(&endpoint, c.addr, "localhost").await {
            installed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(installed, "the rebuilt artifact installs");
    assert_eq!(std::fs::read(&stored).unwrap(), bytes);
}

fn bytes_down(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("fleet_bytes_down_total ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("bytes-down counter")
}

#[tokio::test(flavor = "current_thread")]
async fn an_unfinished_download_resumes_and_an_unbuildable_variant_is_explained() {
    let dir = scratch("deploy-resume");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(device_config(&state));

    // The bytes held from an interrupted download (the first 100,000, as
    // the deployer keeps them in `deployment/partial.*`) are not sent again.
    create_and_deploy(&mut admin, task("a", ModelSpec::fashion_2nn(), 1)).await;
    let (d, bytes) = fetch_deployment(&endpoint, &c).await;
    let held = 100_000;
    let partial = state.dir().join("deployment");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("partial.bin"), &bytes[..held]).unwrap();
    std::fs::write(
        partial.join("partial.json"),
        serde_json::to_vec(&serde_json::json!({ "object": d.artifact.object })).unwrap(),
    )
    .unwrap();
    let serving = Serving::new();
    let mut deployer = Deployer::new(&state, serving.clone());
    assert_eq!(deployer.restore().unwrap(), None);
    let before = bytes_down(&c.coordinator.metrics_text().await);
    let checked = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap();
    assert!(matches!(checked, Checked::Installed { .. }), "{checked:?}");
    let sent = bytes_down(&c.coordinator.metrics_text().await) - before;
    assert_eq!(sent, (bytes.len() - held) as u64);
    assert_eq!(
        serving_sha(&serving),
        Some(d.artifact.object.id.to_string())
    );
    assert!(!partial.join("partial.bin").exists());

    // Held bytes that are not the artifact's: the download fails its hash
    // and the next check fetches it whole.
    let fresh = fleet_edge_agent::state::StateDir::at(dir.join("agent-2"));
    let partial = fresh.dir().join("deployment");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("partial.bin"), vec![7u8; held]).unwrap();
    std::fs::write(
        partial.join("partial.json"),
        serde_json::to_vec(&serde_json::json!({ "object": d.artifact.object })).unwrap(),
    )
    .unwrap();
    let serving = Serving::new();
    let mut deployer = Deployer::new(&fresh, serving.clone());
    deployer.restore().unwrap();
    let e = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap_err();
    assert!(matches!(e, DeployError::Download(_)), "{e}");
    assert!(e.to_string().contains("SHA-256 mismatch"), "{e}");
    assert!(serving.predictor().is_none());
    let checked = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap();
    assert!(matches!(checked, Checked::Installed { .. }), "{checked:?}");

    // A model of 60 synthetic features has no int8 artifact (no calibration
    // data for it): the device is told why and what to do.
    let synthetic = ModelSpec::LogReg {
        inputs: 60,
        classes: 10,
    };
    create_and_deploy(&mut admin, task("synthetic", synthetic, 3)).await;
    let e = deployer
        .check(&endpoint, c.addr, "localhost")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, DeployError::Link(_)), "{text}");
    assert!(
        text.contains("no int8 inference artifact") && text.contains("variant to float"),
        "{text}"
    );
    assert_eq!(
        serving_sha(&serving),
        Some(d.artifact.object.id.to_string())
    );
    // The same model's float artifact was built and is listed.
    let AdminResponse::Models(models) = admin
        .call(&AdminRequest::ListModels { task: Some(2) })
        .await
        .unwrap()
    else {
        panic!("no models")
    };
    let artifacts = &models[0].artifacts;
    assert!(
        artifacts
            .iter()
            .any(|a| a.variant == "float" && a.id.is_some()),
        "{artifacts:?}"
    );
    assert!(
        artifacts
            .iter()
            .any(|a| a.variant == "int8"
                && a.error.as_deref().is_some_and(|e| e.contains("reads 60"))),
        "{artifacts:?}"
    );
}
