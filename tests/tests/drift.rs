//! Drift monitoring over the wire: devices fetch the deployed model's drift
//! sketch, send one summary per window over mutual-TLS QUIC, the
//! coordinator flags the cohort whose inputs changed, reports it to
//! administrators and in its metrics, starts a retraining task, and refuses
//! bad summaries with a reason, counted.

use std::time::Duration;

use fleet_coordinator::drift::{MonitorConfig, RetrainPolicy};
use fleet_coordinator::home::DriftSettings;
use fleet_drift::{Hysteresis, Signal, Sketcher, Summary, SummaryBuilder};
use fleet_e2e::{
    InProcess, Peer, code, connect, device_config, hello, metric, ok, scratch, small_task,
};
use fleet_models::data::embedded;
use fleet_models::data::fashion::{NORM, Split};
use fleet_models::{Backend, Dataset, ModelSpec, logits};
use fleet_protocol::ErrorCode;
use fleet_protocol::admin::{AdminRequest, AdminResponse, DriftInfo};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, DriftReport, DriftSpecInfo};

/// A window's summary of `n` images starting at `from`, through the
/// deployed model, brightened by `shift` (intensities 0–1) when non-zero.
fn summary(
    spec: &ModelSpec,
    params: &[f32],
    info: &DriftSpecInfo,
    test: &Dataset,
    from: usize,
    n: usize,
    shift: f32,
) -> Summary {
    let mut features: Vec<f32> =
        test.features()[from * test.dim()..(from + n) * test.dim()].to_vec();
    if shift != 0.0 {
        for v in &mut features {
            let p = (*v * NORM.std + NORM.mean + shift).clamp(0.0, 1.0);
            *v = (p - NORM.mean) / NORM.std;
        }
    }
    let labels = test.labels()[from..from + n].to_vec();
    let data = Dataset::new(features, labels, test.shape().to_vec(), 10, vec![]).unwrap();
    let z = logits(spec, params, data.view(), Backend::DEFAULT).unwrap();
    let mut b = SummaryBuilder::new(Sketcher::new(info.spec.clone()).unwrap());
    b.observe_batch(data.features(), &z, Some(data.labels()));
    b.take()
}

async fn drift_info(admin: &mut fleet_coordinator::cli::admin::AdminClient) -> Option<DriftInfo> {
    match ok(admin, AdminRequest::Drift).await {
        AdminResponse::Drift(d) => d,
        other => panic!("{other:?}"),
    }
}

async fn session(c: &InProcess, state: &fleet_edge_agent::state::StateDir) -> Peer {
    let mut p = connect(c.addr, device_config(state)).await;
    assert!(matches!(
        p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    ));
    p
}

/// Drift windows of the in-process test: long enough never to close by
/// themselves while it runs.
const WINDOW_SECS: u64 = 3600;

/// A minute from now, for a wait that fails saying what it expected.
struct Deadline(std::time::Instant);

impl Deadline {
    fn in_a_minute() -> Self {
        Self(std::time::Instant::now() + Duration::from_secs(60))
    }

    /// Fails, saying what was expected, once the minute has passed; else
    /// waits 50 ms before the next poll.
    async fn tick(&self, what: &str) {
        assert!(
            std::time::Instant::now() < self.0,
            "timed out after 60 s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_drifting_cohort_is_flagged_reported_and_retrained() {
    let dir = scratch("drift");
    // Windows of an hour, closed by moving the coordinator's clock (never by
    // waiting): each window holds exactly the summaries sent for it,
    // however slow the machine.
    let drift = DriftSettings {
        window_secs: WINDOW_SECS,
        // Windows of 500 inputs per device: PSI of 10 bins has a noise floor
        // near 0.04 per feature, so the thresholds sit higher than the defaults
        // (sized for thousands of inputs).
        thresholds: MonitorConfig {
            min_inputs: 400,
            covariate: Hysteresis {
                raise: 0.25,
                clear: 0.1,
                raise_after: 2,
                clear_after: 3,
            },
            label: Hysteresis {
                raise: 0.25,
                clear: 0.1,
                raise_after: 2,
                clear_after: 3,
            },
            confidence: Hysteresis {
                raise: 0.25,
                clear: 0.1,
                raise_after: 2,
                clear_after: 3,
            },
            accuracy: Hysteresis {
                raise: 0.1,
                clear: 0.05,
                raise_after: 2,
                clear_after: 3,
            },
            ..MonitorConfig::default()
        },
        retrain: RetrainPolicy {
            enabled: true,
            rounds: 2,
            cooldown_windows: 100,
            ..RetrainPolicy::default()
        },
    };
    let c = InProcess::start_with(&dir, drift).await;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let task = small_task("drift", &spec);
    let AdminResponse::Done {
        id: Some(task_id), ..
    } = ok(&mut admin, AdminRequest::CreateTask(Box::new(task.clone()))).await
    else {
        panic!("task not created")
    };
    let AdminResponse::Models(models) = ok(
        &mut admin,
        AdminRequest::ListModels {
            task: Some(task_id),
        },
    )
    .await
    else {
        panic!("no models")
    };
    ok(
        &mut admin,
        AdminRequest::Deploy {
            model: models[0].id.clone(),
        },
    )
    .await;
    let params = spec.init_params(task.seed);

    let (_, north) = c.enroll(&mut admin, &dir.join("north")).await;
    let (_, south) = c.enroll(&mut admin, &dir.join("south")).await;
    let mut devices = [session(&c, &north).await, session(&c, &south).await];
    // The coordinator follows the deployment (within a second).
    let deadline = Deadline::in_a_minute();
    let info = loop {
        if let Some(CoordinatorMessage::DriftSpec(Some(i))) =
            devices[0].call(&AgentMessage::GetDriftSpec).await
        {
            break i;
        }
        deadline.tick("the deployed model to be monitored").await;
    };
    assert_eq!(info.window_secs, WINDOW_SECS);

    // Bad summaries: refused with a reason, counted, nothing merged.
    let test = embedded::load(Split::Train).unwrap();
    let good = summary(&spec, &params, &info, &test, 0, 300, 0.0);
    let refuse = |r: Option<CoordinatorMessage>| match r {
        Some(CoordinatorMessage::Error(e)) => e.message,
        other => panic!("not refused: {other:?}"),
    };
    let mut wrong_version = DriftReport {
        deployment: info.deployment + 7,
        tags: vec![],
        summary: good.clone(),
    };
    let msg = refuse(
        devices[0]
            .call(&AgentMessage::DriftReport(wrong_version.clone()))
            .await,
    );
    assert!(msg.contains("model version"), "{msg}");
    wrong_version.deployment = info.deployment;
    wrong_version.summary.features.pop();
    let msg = refuse(
        devices[0]
            .call(&AgentMessage::DriftReport(wrong_version.clone()))
            .await,
    );
    assert!(msg.contains("features has"), "{msg}");
    let mut negative = good.clone();
    negative.predicted[2] = -4.0;
    let r = devices[0]
        .call(&AgentMessage::DriftReport(DriftReport {
            deployment: info.deployment,
            tags: vec![],
            summary: negative,
        }))
        .await;
    assert_eq!(code(r), Some(ErrorCode::Malformed));

    // Windows: north sends clean images; south's get brighter from the third window on.
    for w in 0..5usize {
        for (k, p) in devices.iter_mut().enumerate() {
            let shift = if k == 1 && w >= 2 { 0.3 } else { 0.0 };
            let s = summary(&spec, &params, &info, &test, 500 * (2 * w + k), 500, shift);
            let tag = if k == 0 {
                "region:north"
            } else {
                "region:south"
            };
            let r = p
                .call(&AgentMessage::DriftReport(DriftReport {
                    deployment: info.deployment,
                    tags: vec![tag.into()],
                    summary: s,
                }))
                .await;
            assert!(
                matches!(r, Some(CoordinatorMessage::DriftAccepted { window }) if window == w as u64),
                "device {k}'s summary {w} should go to window {w}: {r:?}"
            );
        }
        // Close the window: one window's time passes, then the next tick
        // closes it.
        c.coordinator.advance_clock(WINDOW_SECS * 1000);
        let deadline = Deadline::in_a_minute();
        while drift_info(&mut admin)
            .await
            .and_then(|d| d.window)
            .is_none_or(|closed| closed < w as u64)
        {
            deadline.tick(&format!("drift window {w} to close")).await;
        }
    }
    let d = drift_info(&mut admin).await.unwrap();
    let south_scope = d
        .scopes
        .iter()
        .find(|s| s.scope == "cohort region:south")
        .expect("south reported");
    assert!(south_scope.raised.contains(&Signal::Covariate), "{d:#?}");
    let north_scope = d
        .scopes
        .iter()
        .find(|s| s.scope == "cohort region:north")
        .unwrap();
    assert!(north_scope.raised.is_empty(), "{d:#?}");
    let raised = d
        .events
        .iter()
        .find(|e| e.raised && e.scope == "cohort region:south" && e.signal == Signal::Covariate)
        .expect("a raise event");
    assert!(
        raised
            .action
            .as_deref()
            .unwrap_or("")
            .contains("retraining requested"),
        "{raised:?}"
    );
    assert!(
        d.rejected.iter().any(|(r, n)| r == "version" && *n == 1),
        "{:?}",
        d.rejected
    );
    assert!(d.rejected.iter().any(|(r, n)| r == "bins" && *n == 1));
    assert!(d.rejected.iter().any(|(r, n)| r == "count" && *n == 1));

    // The retraining task was created from the deployed model and started.
    let AdminResponse::Tasks(tasks) = ok(&mut admin, AdminRequest::ListTasks).await else {
        panic!("no tasks")
    };
    let retrain = tasks
        .iter()
        .find(|t| {
            t.spec
                .name
                .contains("retrain: covariate drift in cohort region:south")
        })
        .expect("retraining task");
    assert_ne!(retrain.id, task_id);

    // Metrics per cohort and refusals by reason.
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "fleet_drift_flag{scope=\"region:south\",signal=\"covariate\"}"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "fleet_drift_flag{scope=\"region:north\",signal=\"covariate\"}"
        ),
        0
    );
    assert_eq!(
        metric(&text, "fleet_drift_rejected_total{reason=\"version\"}"),
        1
    );
    assert_eq!(
        metric(&text, "fleet_drift_rejected_total{reason=\"count\"}"),
        1
    );
    assert!(metric(&text, "fleet_drift_summaries_total") >= 10);
}

#[test]
fn an_agent_summarises_what_it_serves_with_noise_and_the_coordinator_merges_it() {
    use fleet_e2e::{ProcessFleet, ask_socket, wait_for};
    use fleet_edge_agent::inference::endpoint::Request;
    let mut fleet = ProcessFleet::new("drift-agent", 1, "embedded");
    // Windows of one second: stop the coordinator, change its settings, restart.
    fleet.coordinator = None;
    let path = fleet.home.join("coordinator.json");
    let mut settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    settings["drift"] = serde_json::json!({ "window_secs": 1 });
    std::fs::write(&path, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
    fleet.start_coordinator();

    let socket = fleet.dir.join("agent.sock");
    fleet.start_agent(
        0,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--deployment-check-secs",
            "1",
            "--drift-tag",
            "region:lab",
            "--drift-noise",
            "1.0",
        ],
    );
    // Deploy the task's initial model: the agent fetches and serves it.
    let out = fleet.create_task("drift", 1, 1, &[]);
    assert!(out.contains("task 1 created"), "{out}");
    let models = fleet.admin_json(&["models", "list", "--task", "1"]);
    let model = models[0]["id"].as_str().unwrap().to_string();
    fleet.admin(&["models", "deploy", &model[..12]]);
    let (images, _) = embedded::raw(Split::Test).unwrap();
    let pixels: Vec<Vec<u8>> = images
        .data
        .chunks(784)
        .take(50)
        .map(<[u8]>::to_vec)
        .collect();
    wait_for(120, "the agent to serve the deployed model", || {
        ask_socket(&socket, &Request::Info).filter(|r| r.ok)
    });
    // Serve predictions until the coordinator has merged a summary from the
    // device into a closed window, under its tag.
    let report = wait_for(120, "a drift summary from the agent", || {
        let answer = ask_socket(
            &socket,
            &Request::PredictPixels {
                pixels: pixels.clone(),
            },
        )?;
        assert!(answer.ok, "{answer:?}");
        let d = fleet.admin_json(&["drift", "--scope", "all"]);
        let scopes = d["scopes"].as_array()?;
        scopes
            .iter()
            .any(|s| s["scope"] == "cohort region:lab" && s["devices"] == 1)
            .then_some(d)
    });
    let scopes = report["scopes"].as_array().unwrap();
    assert!(scopes.iter().any(|s| s["scope"] == "device 1"), "{report}");
    assert_eq!(report["deployment"], 1);
    // The summaries were noised and accounted in the agent's ledger.
    let ledger = std::fs::read_to_string(fleet.dir.join("agent-0").join("drift-privacy.json"))
        .expect("the agent's drift privacy ledger");
    assert!(ledger.contains("noise_multiplier"), "{ledger}");
}
