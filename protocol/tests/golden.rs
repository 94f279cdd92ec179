//! Golden bytes of the wire format.
//!
//! One value of every wire message, of every variant of every wire enum and
//! of every struct they carry (those of `fleet_models` and
//! `fleet_aggregation` included), each with fixed, non-default contents, and
//! the postcard payload [`fleet_protocol::encode`] puts in its frame, as a
//! hex literal recorded once. Each test checks that the value still encodes
//! to exactly those bytes and that the recorded bytes still decode to the
//! value.
//!
//! A failing golden means the wire format changed. Either undo the change,
//! or follow the rule of `protocol/src/version.rs`: bump `PROTOCOL_VERSION`,
//! then re-record the goldens together with [`RECORDED_AT`]. To re-record,
//! run `FLEET_GOLDEN_PRINT=1 cargo test -p fleet-protocol --test golden --
//! --nocapture`, which prints `name hex` for every golden (the failure
//! messages also show the new bytes), and paste the new hex.
//!
//! An added variant cannot go without a golden: each enum has a `match`
//! without a wildcard arm naming every variant's golden (it stops compiling
//! until the new variant has a name), and [`check_enum`] also checks that
//! the goldens cover every variant index, the first missing one included.

use std::collections::BTreeSet;
use std::fmt::Debug;

use fleet_aggregation::codec::{Codec, ValueCodec};
use fleet_aggregation::privacy::accountant::ledger::{PrivacyBudget, Spent};
use fleet_aggregation::privacy::adaptive::AdaptiveClipping;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{RelativeBound, Rule, ServerOptimizer, StrategyConfig};
use fleet_drift::{Scores, Signal, SketchSpec, Summary};
use fleet_models::export::Variant;
use fleet_models::{LayoutFingerprint, ModelSpec, TrainConfig};
use fleet_protocol::admin::{
    AdminRequest, AdminResponse, ArtifactInfo, BudgetInfo, DeviceInfo, DriftEventInfo, DriftInfo,
    DriftScopeInfo, ModelInfo, RoundInfo, TaskCommand, TaskInfo, TaskState,
};
use fleet_protocol::close;
use fleet_protocol::error::{ErrorCode, WireError};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, DeployedArtifact, Deployment, DriftReport,
    DriftSpecInfo, ObjectId, ObjectRef, Plan, UpdateMeta,
};
use fleet_protocol::task::{EngineConfig, TaskSpec};
use fleet_protocol::{MIN_SUPPORTED_VERSION, PROTOCOL_VERSION, decode, encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The protocol version every golden below was recorded at.
///
/// Changing any golden means the wire format changed, which needs a
/// `PROTOCOL_VERSION` bump (the rule is in `protocol/src/version.rs`); the
/// goldens are then re-recorded together with the new version here. Bumping
/// the version without re-recording (or the reverse) fails this test.
const RECORDED_AT: u16 = 6;

#[test]
fn goldens_were_recorded_at_this_protocol_version() {
    assert_eq!(
        PROTOCOL_VERSION, RECORDED_AT,
        "PROTOCOL_VERSION changed: re-record the goldens of tests/golden.rs at the new version \
         and update RECORDED_AT (see protocol/src/version.rs)"
    );
    const { assert!(MIN_SUPPORTED_VERSION <= PROTOCOL_VERSION) };
}

// ---------------------------------------------------------------------------
// Checking

/// One golden: its name, the hex of its postcard payload, and its value.
type Golden<T> = (&'static str, &'static str, T);

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The payload of `value`'s frame, as the crate sends it.
fn payload<T: Serialize>(value: &T) -> Vec<u8> {
    let frame = encode(value);
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "frame header");
    frame[4..].to_vec()
}

/// Checks one golden; returns what is wrong with it.
fn check<T>(name: &str, hex: &str, value: &T) -> Vec<String>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let now = to_hex(&payload(value));
    if std::env::var_os("FLEET_GOLDEN_PRINT").is_some() {
        println!("{name} {now}");
    }
    let mut wrong = Vec::new();
    if now != hex {
        wrong.push(format!(
            "{name}: the bytes changed (a wire format change: see protocol/src/version.rs)\n  \
             recorded {hex}\n  now      {now}"
        ));
    }
    match from_hex(hex).map(|b| decode::<T>(&b)) {
        None => wrong.push(format!("{name}: the recorded hex is not hex")),
        Some(Ok(back)) if back == *value => {}
        Some(Ok(back)) => wrong.push(format!(
            "{name}: the recorded bytes decode to another value: {back:?}"
        )),
        Some(Err(e)) => wrong.push(format!("{name}: the recorded bytes no longer decode: {e}")),
    }
    wrong
}

fn check_all<T>(goldens: &[Golden<T>]) -> Vec<String>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    goldens
        .iter()
        .flat_map(|(name, hex, value)| check(name, hex, value))
        .collect()
}

/// Checks an enum's goldens: one per variant, named by `golden_name` (an
/// exhaustive `match`), covering every variant index of the encoding.
fn check_enum<T>(
    goldens: &[Golden<T>],
    golden_name: fn(&T) -> &'static str,
    type_name: &str,
) -> Vec<String>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut wrong = check_all(goldens);
    let mut indices = BTreeSet::new();
    for (name, _, value) in goldens {
        if golden_name(value) != *name {
            wrong.push(format!(
                "{name}: its value is the variant named {:?}",
                golden_name(value)
            ));
        }
        // Postcard: a varint variant index first (one byte below 128).
        let index = payload(value)[0];
        assert!(index < 0x80, "{name}: more than 127 variants");
        if !indices.insert(index) {
            wrong.push(format!("{name}: a second golden of variant {index}"));
        }
    }
    let n = goldens.len() as u8;
    if indices != (0..n).collect() {
        wrong.push(format!(
            "{type_name}: the goldens cover variants {indices:?}, not 0..{n}"
        ));
    }
    // The first index without a golden must not be a variant (zeros decode
    // as the fields of nearly any variant).
    let mut probe = vec![0u8; 256];
    probe[0] = n;
    if postcard::take_from_bytes::<T>(&probe).is_ok() {
        wrong.push(format!(
            "{type_name}: variant {n} exists but has no golden: add one (and a version bump, \
             see protocol/src/version.rs)"
        ));
    }
    wrong
}

fn report(wrong: Vec<String>) {
    assert!(wrong.is_empty(), "\n{}\n", wrong.join("\n"));
}

// ---------------------------------------------------------------------------
// Values carried by the messages: fixed, non-default contents.

fn object_id(seed: u8) -> ObjectId {
    ObjectId(std::array::from_fn(|i| seed.wrapping_add(i as u8)))
}

fn object_ref() -> ObjectRef {
    ObjectRef {
        id: object_id(0x10),
        size: 300_000,
    }
}

fn fingerprint() -> LayoutFingerprint {
    LayoutFingerprint(std::array::from_fn(|i| 0xf0 ^ i as u8))
}

fn capabilities() -> Capabilities {
    Capabilities {
        memory_mib: 768,
        eligible: true,
    }
}

fn model_spec() -> ModelSpec {
    ModelSpec::Mlp {
        inputs: 784,
        hidden: vec![200, 100],
        classes: 10,
    }
}

fn train_config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 20,
        learning_rate: 0.125,
        momentum: 0.5,
        weight_decay: 0.0009765625,
        prox_mu: 0.25,
        seed: 42,
    }
}

fn dp_config() -> DpConfig {
    DpConfig {
        clip_norm: 1.5,
        noise_multiplier: 0.75,
        placement: NoisePlacement::Server,
        expected_cohort: 13,
        adaptive: Some(AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.25,
            count_noise_std: 0.625,
        }),
    }
}

fn codec() -> Codec {
    Codec::TopK {
        fraction: 0.125,
        values: ValueCodec::Int8,
    }
}

fn strategy() -> StrategyConfig {
    StrategyConfig {
        rule: Rule::TrimmedMean { beta: 0.125 },
        server: ServerOptimizer::Adam {
            lr: 0.5,
            beta1: 0.875,
            beta2: 0.9921875,
            tau: 0.001953125,
        },
        max_norm: Some(10.0),
        max_buffered: 64,
        bound: Some(RelativeBound {
            warmup: 7,
            norm_factor: 2.5,
            weight_factor: 3.0,
        }),
        centred: None,
    }
}

fn privacy_budget() -> PrivacyBudget {
    PrivacyBudget {
        epsilon: 8.0,
        delta: 1e-5,
    }
}

fn spent() -> Spent {
    Spent {
        epsilon_rdp: 2.5,
        epsilon_pld: 2.25,
        epsilon: 2.25,
    }
}

fn engine() -> EngineConfig {
    EngineConfig {
        target: 20,
        over_selection: 1.5,
        min_reports: 15,
        selection_timeout_ms: 30_000,
        report_deadline_ms: 120_000,
        rounds: 50,
        pace_jitter_ms: 5_000,
        retry_ms: 2_500,
        seed: 7,
        max_participations: Some(4),
        min_separation: 2,
        selection_window_ms: 5_000,
    }
}

fn task_spec() -> TaskSpec {
    TaskSpec {
        name: "fashion-mlp".into(),
        model: model_spec(),
        train: train_config(),
        strategy: strategy(),
        codec: codec(),
        dp: Some(dp_config()),
        budget: Some(privacy_budget()),
        population: 1_000,
        engine: engine(),
        seed: 99,
        variant: Variant::Float,
        max_examples: 5_000,
        secure_aggregation: Some(fleet_protocol::task::SecureAggregation {
            threshold: 5,
            degree: 8,
            stage_timeout_ms: 30_000,
            clip_norm: Some(0.5),
        }),
    }
}

fn secure_plan() -> fleet_protocol::message::SecurePlan {
    fleet_protocol::message::SecurePlan {
        context: fleet_secagg::Context {
            task: 4,
            round: 17,
            attempt: 2,
            params: fleet_secagg::Params {
                threshold: 5,
                degree: 8,
                min_survivors: 80,
                length: 262_144,
            },
        },
        quantiser: fleet_secagg::quantise::Quantiser {
            dim: 199_210,
            padded: 262_144,
            clip: 0.5,
            scale: 4096.0,
            lambda: 1.5e9,
            rotation_seed: 77,
        },
        stage_timeout_ms: 30_000,
    }
}

fn plan() -> Plan {
    Plan {
        task: 4,
        round: 17,
        model: object_ref(),
        spec: model_spec(),
        train: train_config(),
        dp: Some(dp_config()),
        codec: codec(),
        report_within_ms: 90_000,
        secure: Some(Box::new(secure_plan())),
    }
}

fn update_meta() -> UpdateMeta {
    UpdateMeta {
        task: 4,
        round: 17,
        fingerprint: fingerprint(),
        object: ObjectRef {
            id: object_id(0x40),
            size: 52_000,
        },
        examples: Some(600),
        train_loss: Some(0.375),
    }
}

fn deployed_artifact() -> DeployedArtifact {
    DeployedArtifact {
        object: ObjectRef {
            id: object_id(0x80),
            size: 180_000,
        },
        variant: Variant::Float,
        model_version: 17,
    }
}

fn deployment() -> Deployment {
    Deployment {
        version: 3,
        model: object_ref(),
        spec: model_spec(),
        artifact: deployed_artifact(),
    }
}

fn sketch_spec() -> SketchSpec {
    SketchSpec {
        dim: 784,
        classes: 10,
        projections: 2,
        taps: 3,
        seed: 5,
        bins: 3,
        confidence_bins: 2,
        edges: vec![-0.5, 0.5, 0.25, 0.75],
    }
}

fn drift_spec_info() -> DriftSpecInfo {
    DriftSpecInfo {
        deployment: 3,
        spec: sketch_spec(),
        window_secs: 3_600,
    }
}

fn summary() -> Summary {
    Summary {
        features: vec![1.0, 2.0, 3.0],
        predicted: vec![4.0, 5.0],
        confidence: vec![0.5, 1.5],
        labels: vec![2.0, 1.0],
        labeled: 3.0,
        correct: 2.0,
    }
}

fn drift_report() -> DriftReport {
    DriftReport {
        deployment: 3,
        tags: vec!["eu".into(), "arm64".into()],
        summary: summary(),
    }
}

fn wire_error() -> WireError {
    WireError {
        code: ErrorCode::NoSuchRound,
        message: "no task 9".into(),
    }
}

fn scores() -> Scores {
    Scores {
        against_baseline: true,
        inputs: 120.0,
        predictions: 100.0,
        covariate_psi: 0.25,
        covariate_feature: 2,
        covariate_js: 0.125,
        covariate_ks: 0.0625,
        label_psi: Some(0.5),
        confidence_psi: Some(0.375),
        accuracy: Some(0.875),
        accuracy_drop: Some(0.03125),
    }
}

fn device_info() -> DeviceInfo {
    DeviceInfo {
        id: 12,
        label: "pixel-7".into(),
        enrolled_at: 1_700_000_000,
        revoked_at: Some(1_700_086_400),
        last_seen: Some(1_700_043_200),
        connected: true,
    }
}

fn task_info() -> TaskInfo {
    TaskInfo {
        id: 4,
        spec: task_spec(),
        state: TaskState::Running,
        rounds_closed: 16,
        model: "0123abcd".into(),
        note: Some("budget spent".into()),
    }
}

fn round_info() -> RoundInfo {
    RoundInfo {
        task: 4,
        round: 16,
        outcome: "closed".into(),
        ended_at: Some(1_700_000_123_456),
        participants: vec![3, 12, 200],
        model: Some("89abcdef".into()),
        epsilon: Some(1.75),
    }
}

fn artifact_info() -> ArtifactInfo {
    ArtifactInfo {
        variant: "int8".into(),
        id: Some("fedcba98".into()),
        size: Some(45_000),
        error: Some("none".into()),
    }
}

fn model_info() -> ModelInfo {
    ModelInfo {
        id: "0123abcd".into(),
        task: 4,
        round: 16,
        size: 300_000,
        created_at: 1_700_000_100,
        deployed: true,
        artifacts: vec![artifact_info()],
    }
}

fn budget_info() -> BudgetInfo {
    BudgetInfo {
        task: 4,
        private: true,
        budget: Some(privacy_budget()),
        spent: Some(spent()),
        delta: Some(1e-5),
        rounds: 16,
    }
}

fn drift_scope_info() -> DriftScopeInfo {
    DriftScopeInfo {
        scope: "cohort eu".into(),
        devices: 40,
        scores: Some(scores()),
        raised: vec![Signal::Label, Signal::Accuracy],
    }
}

fn drift_event_info() -> DriftEventInfo {
    DriftEventInfo {
        window: 8,
        at: 1_700_003_600,
        scope: "fleet".into(),
        signal: Signal::Confidence,
        raised: true,
        score: 0.625,
        action: Some("retrain".into()),
    }
}

fn drift_info() -> DriftInfo {
    DriftInfo {
        deployment: 3,
        window_secs: 3_600,
        window: Some(8),
        closed_at: Some(1_700_003_600),
        scopes: vec![drift_scope_info()],
        events: vec![drift_event_info()],
        rejected: vec![("bins".into(), 2)],
    }
}

// ---------------------------------------------------------------------------
// Messages

fn agent_message_golden(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello { .. } => "AgentMessage::Hello",
        AgentMessage::CheckIn { .. } => "AgentMessage::CheckIn",
        AgentMessage::Fetch { .. } => "AgentMessage::Fetch",
        AgentMessage::BeginUpload(_) => "AgentMessage::BeginUpload",
        AgentMessage::Enroll { .. } => "AgentMessage::Enroll",
        AgentMessage::GetDeployment => "AgentMessage::GetDeployment",
        AgentMessage::UploadChunk { .. } => "AgentMessage::UploadChunk",
        AgentMessage::GetDriftSpec => "AgentMessage::GetDriftSpec",
        AgentMessage::DriftReport(_) => "AgentMessage::DriftReport",
        AgentMessage::Renew { .. } => "AgentMessage::Renew",
        AgentMessage::Secure { .. } => "AgentMessage::Secure",
        AgentMessage::SecureChunk { .. } => "AgentMessage::SecureChunk",
    }
}

#[test]
fn agent_messages() {
    let goldens: Vec<Golden<AgentMessage>> = vec![
        (
            "AgentMessage::Hello",
            "00010116666c6565742d656467652d6167656e7420302e312e30",
            AgentMessage::Hello {
                version: 1,
                min_version: 1,
                software: "fleet-edge-agent 0.1.0".into(),
            },
        ),
        (
            "AgentMessage::CheckIn",
            "01800601",
            AgentMessage::CheckIn {
                capabilities: capabilities(),
            },
        ),
        (
            "AgentMessage::Fetch",
            "02101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f808004",
            AgentMessage::Fetch {
                object: object_id(0x10),
                offset: 65_536,
            },
        ),
        (
            "AgentMessage::BeginUpload",
            "030411f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffe0e1e2e3e4e5e6e7e8e9eaebecedeeef404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5fa0960301d804010000c03e",
            AgentMessage::BeginUpload(update_meta()),
        ),
        (
            "AgentMessage::Enroll",
            "0408746f6b2d33663961043082010a",
            AgentMessage::Enroll {
                token: "tok-3f9a".into(),
                csr: vec![0x30, 0x82, 0x01, 0x0a],
            },
        ),
        (
            "AgentMessage::GetDeployment",
            "05",
            AgentMessage::GetDeployment,
        ),
        (
            "AgentMessage::UploadChunk",
            "06404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f800804010203fa",
            AgentMessage::UploadChunk {
                object: object_id(0x40),
                offset: 1_024,
                data: vec![1, 2, 3, 250],
            },
        ),
        (
            "AgentMessage::GetDriftSpec",
            "07",
            AgentMessage::GetDriftSpec,
        ),
        (
            "AgentMessage::DriftReport",
            "0803020265750561726d3634030000803f000000400000404002000080400000a040020000003f0000c03f02000000400000803f0000404000000040",
            AgentMessage::DriftReport(drift_report()),
        ),
        (
            "AgentMessage::Renew",
            "09043082010a",
            AgentMessage::Renew {
                csr: vec![0x30, 0x82, 0x01, 0x0a],
            },
        ),
        (
            "AgentMessage::Secure",
            "0a010201030000",
            AgentMessage::Secure {
                task: 1,
                round: 2,
                message: Some(fleet_secagg::DeviceMessage::Reveal(
                    fleet_secagg::message::Reveal::default(),
                )),
            },
        ),
        (
            "AgentMessage::SecureChunk",
            "0b010203020102",
            AgentMessage::SecureChunk {
                task: 1,
                round: 2,
                offset: 3,
                data: vec![1, 2],
            },
        ),
    ];
    report(check_enum(&goldens, agent_message_golden, "AgentMessage"));
}

fn coordinator_message_golden(m: &CoordinatorMessage) -> &'static str {
    match m {
        CoordinatorMessage::HelloAck { .. } => "CoordinatorMessage::HelloAck",
        CoordinatorMessage::Plan(_) => "CoordinatorMessage::Plan",
        CoordinatorMessage::ComeBackLater { .. } => "CoordinatorMessage::ComeBackLater",
        CoordinatorMessage::Chunk { .. } => "CoordinatorMessage::Chunk",
        CoordinatorMessage::UploadProgress { .. } => "CoordinatorMessage::UploadProgress",
        CoordinatorMessage::UploadAccepted { .. } => "CoordinatorMessage::UploadAccepted",
        CoordinatorMessage::Enrolled { .. } => "CoordinatorMessage::Enrolled",
        CoordinatorMessage::Deployment(_) => "CoordinatorMessage::Deployment",
        CoordinatorMessage::Error(_) => "CoordinatorMessage::Error",
        CoordinatorMessage::DriftSpec(_) => "CoordinatorMessage::DriftSpec",
        CoordinatorMessage::DriftAccepted { .. } => "CoordinatorMessage::DriftAccepted",
        CoordinatorMessage::Renewed { .. } => "CoordinatorMessage::Renewed",
        CoordinatorMessage::Secure { .. } => "CoordinatorMessage::Secure",
    }
}

#[test]
fn coordinator_messages() {
    let goldens: Vec<Golden<CoordinatorMessage>> = vec![
        (
            "CoordinatorMessage::HelloAck",
            "0001",
            CoordinatorMessage::HelloAck { version: 1 },
        ),
        (
            "CoordinatorMessage::Plan",
            "010411101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2fe0a71201900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a01000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f030000003e0290bf0501041102050850808010aa940c808010000000000000e03f000000000000b040000000c00b5ad6414db0ea01",
            CoordinatorMessage::Plan(plan()),
        ),
        (
            "CoordinatorMessage::ComeBackLater",
            "02c8df02",
            CoordinatorMessage::ComeBackLater { after_ms: 45_000 },
        ),
        (
            "CoordinatorMessage::Chunk",
            "03101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f808004e0a71203090807",
            CoordinatorMessage::Chunk {
                object: object_id(0x10),
                offset: 65_536,
                total: 300_000,
                data: vec![9, 8, 7],
            },
        ),
        (
            "CoordinatorMessage::UploadProgress",
            "04404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f8010",
            CoordinatorMessage::UploadProgress {
                object: object_id(0x40),
                received: 2_048,
            },
        ),
        (
            "CoordinatorMessage::UploadAccepted",
            "05404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f",
            CoordinatorMessage::UploadAccepted {
                object: object_id(0x40),
            },
        ),
        (
            "CoordinatorMessage::Enrolled",
            "060c043082021b",
            CoordinatorMessage::Enrolled {
                device: 12,
                certificate: vec![0x30, 0x82, 0x02, 0x1b],
            },
        ),
        (
            "CoordinatorMessage::Deployment",
            "070103101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2fe0a71201900602c801640a808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0fe0a0011",
            CoordinatorMessage::Deployment(Some(deployment())),
        ),
        (
            "CoordinatorMessage::Error",
            "0806096e6f207461736b2039",
            CoordinatorMessage::Error(wire_error()),
        ),
        (
            "CoordinatorMessage::DriftSpec",
            "09010390060a020305030204000000bf0000003f0000803e0000403f901c",
            CoordinatorMessage::DriftSpec(Some(drift_spec_info())),
        ),
        (
            "CoordinatorMessage::DriftAccepted",
            "0a08",
            CoordinatorMessage::DriftAccepted { window: 8 },
        ),
        (
            "CoordinatorMessage::Renewed",
            "0b043082021b",
            CoordinatorMessage::Renewed {
                certificate: vec![0x30, 0x82, 0x02, 0x1b],
            },
        ),
        (
            "CoordinatorMessage::Secure",
            "0c01020103010400",
            CoordinatorMessage::Secure {
                message: Some(fleet_secagg::ServerMessage::Unmask {
                    survivors: vec![3],
                    dropped: vec![4],
                }),
                after_ms: 0,
            },
        ),
    ];
    report(check_enum(
        &goldens,
        coordinator_message_golden,
        "CoordinatorMessage",
    ));
}

fn admin_request_golden(r: &AdminRequest) -> &'static str {
    match r {
        AdminRequest::Hello { .. } => "AdminRequest::Hello",
        AdminRequest::CreateToken { .. } => "AdminRequest::CreateToken",
        AdminRequest::ListDevices => "AdminRequest::ListDevices",
        AdminRequest::RevokeDevice { .. } => "AdminRequest::RevokeDevice",
        AdminRequest::CreateTask(_) => "AdminRequest::CreateTask",
        AdminRequest::SetTaskState { .. } => "AdminRequest::SetTaskState",
        AdminRequest::ListTasks => "AdminRequest::ListTasks",
        AdminRequest::ListRounds { .. } => "AdminRequest::ListRounds",
        AdminRequest::ListModels { .. } => "AdminRequest::ListModels",
        AdminRequest::Deploy { .. } => "AdminRequest::Deploy",
        AdminRequest::Rollback => "AdminRequest::Rollback",
        AdminRequest::Budget { .. } => "AdminRequest::Budget",
        AdminRequest::Drift => "AdminRequest::Drift",
    }
}

#[test]
fn admin_requests() {
    let goldens: Vec<Golden<AdminRequest>> = vec![
        (
            "AdminRequest::Hello",
            "000101",
            AdminRequest::Hello {
                version: 1,
                min_version: 1,
            },
        ),
        (
            "AdminRequest::CreateToken",
            "0107706978656c2d3780a305",
            AdminRequest::CreateToken {
                label: "pixel-7".into(),
                ttl_secs: 86_400,
            },
        ),
        ("AdminRequest::ListDevices", "02", AdminRequest::ListDevices),
        (
            "AdminRequest::RevokeDevice",
            "030c",
            AdminRequest::RevokeDevice { device: 12 },
        ),
        (
            "AdminRequest::CreateTask",
            "040b66617368696f6e2d6d6c7001900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a02000000000000c03f030000003f0000603f00007e3f0000003b0100000000000024404001070000000000000440000000000000084000030000003e0201000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f010000000000002040f168e388b5f8e43ee80714000000000000f83f0fb0ea01c0a907328827c41307010402882763008827010508b0ea0101000000000000e03f",
            AdminRequest::CreateTask(Box::new(task_spec())),
        ),
        (
            "AdminRequest::SetTaskState",
            "050401",
            AdminRequest::SetTaskState {
                task: 4,
                command: TaskCommand::Pause,
            },
        ),
        ("AdminRequest::ListTasks", "06", AdminRequest::ListTasks),
        (
            "AdminRequest::ListRounds",
            "0704",
            AdminRequest::ListRounds { task: 4 },
        ),
        (
            "AdminRequest::ListModels",
            "080104",
            AdminRequest::ListModels { task: Some(4) },
        ),
        (
            "AdminRequest::Deploy",
            "0906303132336162",
            AdminRequest::Deploy {
                model: "0123ab".into(),
            },
        ),
        ("AdminRequest::Rollback", "0a", AdminRequest::Rollback),
        (
            "AdminRequest::Budget",
            "0b04",
            AdminRequest::Budget { task: 4 },
        ),
        ("AdminRequest::Drift", "0c", AdminRequest::Drift),
    ];
    report(check_enum(&goldens, admin_request_golden, "AdminRequest"));
}

fn admin_response_golden(r: &AdminResponse) -> &'static str {
    match r {
        AdminResponse::HelloAck { .. } => "AdminResponse::HelloAck",
        AdminResponse::Token { .. } => "AdminResponse::Token",
        AdminResponse::Devices(_) => "AdminResponse::Devices",
        AdminResponse::Tasks(_) => "AdminResponse::Tasks",
        AdminResponse::Rounds(_) => "AdminResponse::Rounds",
        AdminResponse::Models(_) => "AdminResponse::Models",
        AdminResponse::Budget(_) => "AdminResponse::Budget",
        AdminResponse::Done { .. } => "AdminResponse::Done",
        AdminResponse::Error(_) => "AdminResponse::Error",
        AdminResponse::Drift(_) => "AdminResponse::Drift",
    }
}

#[test]
fn admin_responses() {
    let goldens: Vec<Golden<AdminResponse>> = vec![
        (
            "AdminResponse::HelloAck",
            "0001",
            AdminResponse::HelloAck { version: 1 },
        ),
        (
            "AdminResponse::Token",
            "0108746f6b2d336639618085d5aa06",
            AdminResponse::Token {
                token: "tok-3f9a".into(),
                expires_at: 1_700_086_400,
            },
        ),
        (
            "AdminResponse::Devices",
            "02010c07706978656c2d3780e2cfaa06018085d5aa0601c0b3d2aa0601",
            AdminResponse::Devices(vec![device_info()]),
        ),
        (
            "AdminResponse::Tasks",
            "0301040b66617368696f6e2d6d6c7001900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a02000000000000c03f030000003f0000603f00007e3f0000003b0100000000000024404001070000000000000440000000000000084000030000003e0201000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f010000000000002040f168e388b5f8e43ee80714000000000000f83f0fb0ea01c0a907328827c41307010402882763008827010508b0ea0101000000000000e03f0110083031323361626364010c627564676574207370656e74",
            AdminResponse::Tasks(vec![task_info()]),
        ),
        (
            "AdminResponse::Rounds",
            "0401041006636c6f73656401c0949dffbc3103030cc8010108383961626364656601000000000000fc3f",
            AdminResponse::Rounds(vec![round_info()]),
        ),
        (
            "AdminResponse::Models",
            "05010830313233616263640410e0a712e4e2cfaa06010104696e74380108666564636261393801c8df0201046e6f6e65",
            AdminResponse::Models(vec![model_info()]),
        ),
        (
            "AdminResponse::Budget",
            "060401010000000000002040f168e388b5f8e43e0100000000000004400000000000000240000000000000024001f168e388b5f8e43e10",
            AdminResponse::Budget(budget_info()),
        ),
        (
            "AdminResponse::Done",
            "070e7461736b203420637265617465640104",
            AdminResponse::Done {
                message: "task 4 created".into(),
                id: Some(4),
            },
        ),
        (
            "AdminResponse::Error",
            "0806096e6f207461736b2039",
            AdminResponse::Error(wire_error()),
        ),
        (
            "AdminResponse::Drift",
            "090103901c01080190fecfaa060109636f686f72742065752801010000000000005e400000000000005940000000000000d03f02000000000000c03f000000000000b03f01000000000000e03f01000000000000d83f01000000000000ec3f01000000000000a03f020103010890fecfaa0605666c6565740201000000000000e43f01077265747261696e010462696e7302",
            AdminResponse::Drift(Some(drift_info())),
        ),
    ];
    report(check_enum(&goldens, admin_response_golden, "AdminResponse"));
}

// ---------------------------------------------------------------------------
// The other enums on the wire, every variant.

fn error_code_golden(c: &ErrorCode) -> &'static str {
    match c {
        ErrorCode::IncompatibleVersion => "ErrorCode::IncompatibleVersion",
        ErrorCode::Malformed => "ErrorCode::Malformed",
        ErrorCode::TooLarge => "ErrorCode::TooLarge",
        ErrorCode::UnknownDevice => "ErrorCode::UnknownDevice",
        ErrorCode::Revoked => "ErrorCode::Revoked",
        ErrorCode::Replayed => "ErrorCode::Replayed",
        ErrorCode::NoSuchRound => "ErrorCode::NoSuchRound",
        ErrorCode::UpdateRejected => "ErrorCode::UpdateRejected",
        ErrorCode::HashMismatch => "ErrorCode::HashMismatch",
        ErrorCode::Internal => "ErrorCode::Internal",
    }
}

#[test]
fn error_codes() {
    let goldens: Vec<Golden<ErrorCode>> = vec![
        (
            "ErrorCode::IncompatibleVersion",
            "00",
            ErrorCode::IncompatibleVersion,
        ),
        ("ErrorCode::Malformed", "01", ErrorCode::Malformed),
        ("ErrorCode::TooLarge", "02", ErrorCode::TooLarge),
        ("ErrorCode::UnknownDevice", "03", ErrorCode::UnknownDevice),
        ("ErrorCode::Revoked", "04", ErrorCode::Revoked),
        ("ErrorCode::Replayed", "05", ErrorCode::Replayed),
        ("ErrorCode::NoSuchRound", "06", ErrorCode::NoSuchRound),
        ("ErrorCode::UpdateRejected", "07", ErrorCode::UpdateRejected),
        ("ErrorCode::HashMismatch", "08", ErrorCode::HashMismatch),
        ("ErrorCode::Internal", "09", ErrorCode::Internal),
    ];
    report(check_enum(&goldens, error_code_golden, "ErrorCode"));
}

fn task_command_golden(c: &TaskCommand) -> &'static str {
    match c {
        TaskCommand::Start => "TaskCommand::Start",
        TaskCommand::Pause => "TaskCommand::Pause",
        TaskCommand::Stop => "TaskCommand::Stop",
    }
}

fn task_state_golden(s: &TaskState) -> &'static str {
    match s {
        TaskState::Paused => "TaskState::Paused",
        TaskState::Running => "TaskState::Running",
        TaskState::Finished => "TaskState::Finished",
        TaskState::Stopped => "TaskState::Stopped",
    }
}

#[test]
fn task_enums() {
    let mut wrong = check_enum(
        &[
            ("TaskCommand::Start", "00", TaskCommand::Start),
            ("TaskCommand::Pause", "01", TaskCommand::Pause),
            ("TaskCommand::Stop", "02", TaskCommand::Stop),
        ],
        task_command_golden,
        "TaskCommand",
    );
    wrong.extend(check_enum(
        &[
            ("TaskState::Paused", "00", TaskState::Paused),
            ("TaskState::Running", "01", TaskState::Running),
            ("TaskState::Finished", "02", TaskState::Finished),
            ("TaskState::Stopped", "03", TaskState::Stopped),
        ],
        task_state_golden,
        "TaskState",
    ));
    report(wrong);
}

fn model_spec_golden(s: &ModelSpec) -> &'static str {
    match s {
        ModelSpec::LogReg { .. } => "ModelSpec::LogReg",
        ModelSpec::Mlp { .. } => "ModelSpec::Mlp",
        ModelSpec::Cnn { .. } => "ModelSpec::Cnn",
    }
}

fn variant_golden(v: &Variant) -> &'static str {
    match v {
        Variant::Float => "Variant::Float",
        Variant::Int8 => "Variant::Int8",
    }
}

fn codec_golden(c: &Codec) -> &'static str {
    match c {
        Codec::F32 => "Codec::F32",
        Codec::F16 => "Codec::F16",
        Codec::Int8 { .. } => "Codec::Int8",
        Codec::TopK { .. } => "Codec::TopK",
    }
}

fn value_codec_golden(c: &ValueCodec) -> &'static str {
    match c {
        ValueCodec::F32 => "ValueCodec::F32",
        ValueCodec::F16 => "ValueCodec::F16",
        ValueCodec::Int8 => "ValueCodec::Int8",
    }
}

fn rule_golden(r: &Rule) -> &'static str {
    match r {
        Rule::Mean => "Rule::Mean",
        Rule::Median => "Rule::Median",
        Rule::TrimmedMean { .. } => "Rule::TrimmedMean",
        Rule::Krum { .. } => "Rule::Krum",
        Rule::MultiKrum { .. } => "Rule::MultiKrum",
        Rule::Bulyan { .. } => "Rule::Bulyan",
    }
}

fn server_optimizer_golden(o: &ServerOptimizer) -> &'static str {
    match o {
        ServerOptimizer::Sgd { .. } => "ServerOptimizer::Sgd",
        ServerOptimizer::Momentum { .. } => "ServerOptimizer::Momentum",
        ServerOptimizer::Adagrad { .. } => "ServerOptimizer::Adagrad",
        ServerOptimizer::Adam { .. } => "ServerOptimizer::Adam",
        ServerOptimizer::Yogi { .. } => "ServerOptimizer::Yogi",
    }
}

fn noise_placement_golden(p: &NoisePlacement) -> &'static str {
    match p {
        NoisePlacement::Client => "NoisePlacement::Client",
        NoisePlacement::Server => "NoisePlacement::Server",
    }
}

fn signal_golden(s: &Signal) -> &'static str {
    match s {
        Signal::Covariate => "Signal::Covariate",
        Signal::Label => "Signal::Label",
        Signal::Confidence => "Signal::Confidence",
        Signal::Accuracy => "Signal::Accuracy",
    }
}

#[test]
fn carried_enums_of_other_crates() {
    let mut wrong = check_enum(
        &[
            (
                "ModelSpec::LogReg",
                "0090060a",
                ModelSpec::LogReg {
                    inputs: 784,
                    classes: 10,
                },
            ),
            ("ModelSpec::Mlp", "01900602c801640a", model_spec()),
            (
                "ModelSpec::Cnn",
                "02011c1c0a",
                ModelSpec::Cnn {
                    channels: 1,
                    height: 28,
                    width: 28,
                    classes: 10,
                },
            ),
        ],
        model_spec_golden,
        "ModelSpec",
    );
    wrong.extend(check_enum(
        &[
            ("Variant::Float", "00", Variant::Float),
            ("Variant::Int8", "01", Variant::Int8),
        ],
        variant_golden,
        "Variant",
    ));
    wrong.extend(check_enum(
        &[
            ("Codec::F32", "00", Codec::F32),
            ("Codec::F16", "01", Codec::F16),
            ("Codec::Int8", "028004", Codec::Int8 { chunk: 512 }),
            ("Codec::TopK", "030000003e02", codec()),
        ],
        codec_golden,
        "Codec",
    ));
    wrong.extend(check_enum(
        &[
            ("ValueCodec::F32", "00", ValueCodec::F32),
            ("ValueCodec::F16", "01", ValueCodec::F16),
            ("ValueCodec::Int8", "02", ValueCodec::Int8),
        ],
        value_codec_golden,
        "ValueCodec",
    ));
    wrong.extend(check_enum(
        &[
            ("Rule::Mean", "00", Rule::Mean),
            ("Rule::Median", "01", Rule::Median),
            (
                "Rule::TrimmedMean",
                "02000000000000c03f",
                Rule::TrimmedMean { beta: 0.125 },
            ),
            ("Rule::Krum", "0302", Rule::Krum { f: 2 }),
            ("Rule::MultiKrum", "040205", Rule::MultiKrum { f: 2, m: 5 }),
            ("Rule::Bulyan", "0501", Rule::Bulyan { f: 1 }),
        ],
        rule_golden,
        "Rule",
    ));
    wrong.extend(check_enum(
        &[
            (
                "ServerOptimizer::Sgd",
                "000000403f",
                ServerOptimizer::Sgd { lr: 0.75 },
            ),
            (
                "ServerOptimizer::Momentum",
                "010000403f0000603f",
                ServerOptimizer::Momentum {
                    lr: 0.75,
                    momentum: 0.875,
                },
            ),
            (
                "ServerOptimizer::Adagrad",
                "020000403f0000003f0000803d",
                ServerOptimizer::Adagrad {
                    lr: 0.75,
                    beta1: 0.5,
                    tau: 0.0625,
                },
            ),
            (
                "ServerOptimizer::Adam",
                "030000403f0000003f0000803e0000803d",
                ServerOptimizer::Adam {
                    lr: 0.75,
                    beta1: 0.5,
                    beta2: 0.25,
                    tau: 0.0625,
                },
            ),
            (
                "ServerOptimizer::Yogi",
                "040000403f0000003f0000803e0000003e",
                ServerOptimizer::Yogi {
                    lr: 0.75,
                    beta1: 0.5,
                    beta2: 0.25,
                    tau: 0.125,
                },
            ),
        ],
        server_optimizer_golden,
        "ServerOptimizer",
    ));
    wrong.extend(check_enum(
        &[
            ("NoisePlacement::Client", "00", NoisePlacement::Client),
            ("NoisePlacement::Server", "01", NoisePlacement::Server),
        ],
        noise_placement_golden,
        "NoisePlacement",
    ));
    wrong.extend(check_enum(
        &[
            ("Signal::Covariate", "00", Signal::Covariate),
            ("Signal::Label", "01", Signal::Label),
            ("Signal::Confidence", "02", Signal::Confidence),
            ("Signal::Accuracy", "03", Signal::Accuracy),
        ],
        signal_golden,
        "Signal",
    ));
    report(wrong);
}

// ---------------------------------------------------------------------------
// The structs the messages carry.

#[test]
fn carried_structs() {
    let wrong = [
        check(
            "ObjectId",
            "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f",
            &object_id(0x10),
        ),
        check(
            "ObjectRef",
            "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2fe0a712",
            &object_ref(),
        ),
        check("Capabilities", "800601", &capabilities()),
        check(
            "Plan",
            "0411101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2fe0a71201900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a01000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f030000003e0290bf0501041102050850808010aa940c808010000000000000e03f000000000000b040000000c00b5ad6414db0ea01",
            &plan(),
        ),
        check(
            "UpdateMeta",
            "0411f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffe0e1e2e3e4e5e6e7e8e9eaebecedeeef404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5fa0960301d804010000c03e",
            &update_meta(),
        ),
        check(
            "Deployment",
            "03101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2fe0a71201900602c801640a808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0fe0a0011",
            &deployment(),
        ),
        check(
            "DeployedArtifact",
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0fe0a0011",
            &deployed_artifact(),
        ),
        check(
            "DriftSpecInfo",
            "0390060a020305030204000000bf0000003f0000803e0000403f901c",
            &drift_spec_info(),
        ),
        check(
            "DriftReport",
            "03020265750561726d3634030000803f000000400000404002000080400000a040020000003f0000c03f02000000400000803f0000404000000040",
            &drift_report(),
        ),
        check("WireError", "06096e6f207461736b2039", &wire_error()),
        check(
            "TaskSpec",
            "0b66617368696f6e2d6d6c7001900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a02000000000000c03f030000003f0000603f00007e3f0000003b0100000000000024404001070000000000000440000000000000084000030000003e0201000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f010000000000002040f168e388b5f8e43ee80714000000000000f83f0fb0ea01c0a907328827c41307010402882763008827010508b0ea0101000000000000e03f",
            &task_spec(),
        ),
        check(
            "EngineConfig",
            "14000000000000f83f0fb0ea01c0a907328827c413070104028827",
            &engine(),
        ),
        check(
            "DeviceInfo",
            "0c07706978656c2d3780e2cfaa06018085d5aa0601c0b3d2aa0601",
            &device_info(),
        ),
        check(
            "TaskInfo",
            "040b66617368696f6e2d6d6c7001900602c801640a0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a02000000000000c03f030000003f0000603f00007e3f0000003b0100000000000024404001070000000000000440000000000000084000030000003e0201000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f010000000000002040f168e388b5f8e43ee80714000000000000f83f0fb0ea01c0a907328827c41307010402882763008827010508b0ea0101000000000000e03f0110083031323361626364010c627564676574207370656e74",
            &task_info(),
        ),
        check(
            "RoundInfo",
            "041006636c6f73656401c0949dffbc3103030cc8010108383961626364656601000000000000fc3f",
            &round_info(),
        ),
        check(
            "ModelInfo",
            "0830313233616263640410e0a712e4e2cfaa06010104696e74380108666564636261393801c8df0201046e6f6e65",
            &model_info(),
        ),
        check(
            "ArtifactInfo",
            "04696e74380108666564636261393801c8df0201046e6f6e65",
            &artifact_info(),
        ),
        check(
            "BudgetInfo",
            "0401010000000000002040f168e388b5f8e43e0100000000000004400000000000000240000000000000024001f168e388b5f8e43e10",
            &budget_info(),
        ),
        check(
            "DriftInfo",
            "03901c01080190fecfaa060109636f686f72742065752801010000000000005e400000000000005940000000000000d03f02000000000000c03f000000000000b03f01000000000000e03f01000000000000d83f01000000000000ec3f01000000000000a03f020103010890fecfaa0605666c6565740201000000000000e43f01077265747261696e010462696e7302",
            &drift_info(),
        ),
        check(
            "DriftScopeInfo",
            "09636f686f72742065752801010000000000005e400000000000005940000000000000d03f02000000000000c03f000000000000b03f01000000000000e03f01000000000000d83f01000000000000ec3f01000000000000a03f020103",
            &drift_scope_info(),
        ),
        check(
            "DriftEventInfo",
            "0890fecfaa0605666c6565740201000000000000e43f01077265747261696e",
            &drift_event_info(),
        ),
        check(
            "TrainConfig",
            "0314000000000000c03f000000000000e03f000000000000503f000000000000d03f2a",
            &train_config(),
        ),
        check(
            "LayoutFingerprint",
            "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffe0e1e2e3e4e5e6e7e8e9eaebecedeeef",
            &fingerprint(),
        ),
        check(
            "StrategyConfig",
            "02000000000000c03f030000003f0000603f00007e3f0000003b0100000000000024404001070000000000000440000000000000084000",
            &strategy(),
        ),
        check(
            "DpConfig",
            "000000000000f83f000000000000e83f010d01000000000000e03f000000000000d03f000000000000e43f",
            &dp_config(),
        ),
        check(
            "PrivacyBudget",
            "0000000000002040f168e388b5f8e43e",
            &privacy_budget(),
        ),
        check(
            "Spent",
            "000000000000044000000000000002400000000000000240",
            &spent(),
        ),
        check(
            "SketchSpec",
            "90060a020305030204000000bf0000003f0000803e0000403f",
            &sketch_spec(),
        ),
        check(
            "Summary",
            "030000803f000000400000404002000080400000a040020000003f0000c03f02000000400000803f0000404000000040",
            &summary(),
        ),
        check(
            "Scores",
            "010000000000005e400000000000005940000000000000d03f02000000000000c03f000000000000b03f01000000000000e03f01000000000000d83f01000000000000ec3f01000000000000a03f",
            &scores(),
        ),
    ];
    report(wrong.into_iter().flatten().collect());
}

// ---------------------------------------------------------------------------
// Close codes

/// The QUIC application close codes are wire values too (recorded at
/// [`RECORDED_AT`], same rule as the bytes above).
#[test]
fn close_codes() {
    assert_eq!(
        [
            close::DONE,
            close::FORBIDDEN,
            close::REVOKED,
            close::SHUTDOWN
        ],
        [0, 1, 2, 3],
        "a close code changed: a wire format change (see protocol/src/version.rs)"
    );
}
