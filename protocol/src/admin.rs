//! Administration requests and their answers.
//!
//! An administrator's connection presents an admin certificate; the
//! coordinator refuses these requests from any other role. Each request is
//! one frame on a bidirectional stream and gets one [`AdminResponse`].

use fleet_aggregation::privacy::accountant::ledger::{PrivacyBudget, Spent};
use fleet_drift::{Scores, Signal};
use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::task::TaskSpec;

/// What an administrator asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Version handshake, first on every connection.
    Hello {
        /// Version spoken.
        version: u16,
        /// Oldest version accepted.
        min_version: u16,
    },
    /// A one-time enrollment token for a new device.
    CreateToken {
        /// A label for the device-to-be (for listings).
        label: String,
        /// Validity in seconds.
        ttl_secs: u64,
    },
    /// Enrolled devices.
    ListDevices,
    /// Revokes a device: its certificate is refused from now on and its
    /// live connections are closed.
    RevokeDevice {
        /// The device.
        device: u64,
    },
    /// Registers a task (it starts paused).
    CreateTask(Box<TaskSpec>),
    /// Starts, pauses or stops a task.
    SetTaskState {
        /// The task.
        task: u64,
        /// What to do.
        command: TaskCommand,
    },
    /// Registered tasks.
    ListTasks,
    /// Rounds of a task with their participants.
    ListRounds {
        /// The task.
        task: u64,
    },
    /// Model versions (all tasks, or one).
    ListModels {
        /// Only this task's.
        task: Option<u64>,
    },
    /// Deploys a model version to the fleet, named by its id or a unique prefix of it.
    Deploy {
        /// Hex id or prefix.
        model: String,
    },
    /// Returns to the model deployed before the current one.
    Rollback,
    /// Privacy budget of a task.
    Budget {
        /// The task.
        task: u64,
    },
    /// The drift monitor's last closed window and recent flag changes.
    Drift,
}

/// A change of a task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskCommand {
    /// Run (or resume) the task; only one task runs at a time.
    Start,
    /// Stop handing out work, keep the open round's accepted updates.
    Pause,
    /// End the task for good.
    Stop,
}

/// The coordinator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// The handshake succeeded.
    HelloAck {
        /// Version both sides speak.
        version: u16,
    },
    /// A new enrollment token (shown once; the coordinator keeps only its hash).
    Token {
        /// The token.
        token: String,
        /// Expiry, seconds since the Unix epoch.
        expires_at: u64,
    },
    /// Devices.
    Devices(Vec<DeviceInfo>),
    /// Tasks.
    Tasks(Vec<TaskInfo>),
    /// Rounds.
    Rounds(Vec<RoundInfo>),
    /// Model versions.
    Models(Vec<ModelInfo>),
    /// A task's privacy budget.
    Budget(BudgetInfo),
    /// Done, with a sentence for people (and the id of what was created, if anything).
    Done {
        /// What happened.
        message: String,
        /// Id of a created object.
        id: Option<u64>,
    },
    /// A refusal.
    Error(WireError),
    /// The drift report (none: no model deployed, or not monitored).
    Drift(Option<DriftInfo>),
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Id.
    pub id: u64,
    /// Label given with its token.
    pub label: String,
    /// Enrollment time (Unix seconds).
    pub enrolled_at: u64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<u64>,
    /// Last connection time.
    pub last_seen: Option<u64>,
    /// Connected now.
    pub connected: bool,
}

/// State of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Registered or paused: no work is handed out.
    Paused,
    /// Rounds are running.
    Running,
    /// Every round closed.
    Finished,
    /// Stopped by an administrator, or it could not go on (see its history).
    Stopped,
}

/// A task and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Id.
    pub id: u64,
    /// Definition.
    pub spec: TaskSpec,
    /// State.
    pub state: TaskState,
    /// Rounds closed.
    pub rounds_closed: u64,
    /// Id of the current global model (hex).
    pub model: String,
    /// Why it stopped, when it stopped by itself.
    pub note: Option<String>,
}

/// One closed or abandoned round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundInfo {
    /// Task.
    pub task: u64,
    /// Round number.
    pub round: u64,
    /// `closed` or `abandoned: <why>` or `open`.
    pub outcome: String,
    /// When it ended (Unix ms).
    pub ended_at: Option<u64>,
    /// Devices whose updates were aggregated.
    pub participants: Vec<u64>,
    /// The model it produced (hex id), when closed.
    pub model: Option<String>,
    /// ε spent by the task after this round, when the task is private.
    pub epsilon: Option<f64>,
}

/// A model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Hex id (SHA-256 of its bytes).
    pub id: String,
    /// Task that produced it.
    pub task: u64,
    /// Round that produced it (0: the initial model).
    pub round: u64,
    /// Size in bytes.
    pub size: u64,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    /// Deployed to the fleet now.
    pub deployed: bool,
    /// Its inference artifacts (float and int8) once built.
    #[serde(default)]
    pub artifacts: Vec<ArtifactInfo>,
}

/// One inference artifact of a model version, as the coordinator stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// `float` or `int8`.
    pub variant: String,
    /// Hex SHA-256 of the ONNX file (its object id), when it was built.
    pub id: Option<String>,
    /// Size of the ONNX file in bytes, when it was built.
    pub size: Option<u64>,
    /// Why it could not be built, when it could not.
    pub error: Option<String>,
}

/// A task's privacy spending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetInfo {
    /// Task.
    pub task: u64,
    /// Whether the task applies differential privacy.
    pub private: bool,
    /// The budget, when the task has one.
    pub budget: Option<PrivacyBudget>,
    /// ε spent (RDP, PLD and the reported minimum), when the task is private.
    pub spent: Option<Spent>,
    /// The δ at which `spent` is measured.
    pub delta: Option<f64>,
    /// Private rounds accounted.
    pub rounds: u64,
}

/// The drift monitor's state, for administrators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftInfo {
    /// Deployment monitored.
    pub deployment: u64,
    /// Length of a reporting window (seconds).
    pub window_secs: u64,
    /// The last closed window (none yet: `None`).
    pub window: Option<u64>,
    /// When it closed (Unix seconds).
    pub closed_at: Option<u64>,
    /// Every scope of that window: fleet, cohorts, devices.
    pub scopes: Vec<DriftScopeInfo>,
    /// Recent flag changes, oldest first.
    pub events: Vec<DriftEventInfo>,
    /// Summaries refused since start, by reason.
    pub rejected: Vec<(String, u64)>,
}

/// One scope of a closed window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftScopeInfo {
    /// `fleet`, `cohort <tag>` or `device <id>`.
    pub scope: String,
    /// Devices that reported into it.
    pub devices: u64,
    /// Scores (none: fewer inputs than the monitor's minimum).
    pub scores: Option<Scores>,
    /// Signals flagged after the window.
    pub raised: Vec<Signal>,
}

/// A flag that went up or down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftEventInfo {
    /// Window that closed.
    pub window: u64,
    /// When (Unix seconds).
    pub at: u64,
    /// Scope.
    pub scope: String,
    /// Signal.
    pub signal: Signal,
    /// Up (true) or down.
    pub raised: bool,
    /// The window's score.
    pub score: f64,
    /// What the retraining policy did, if anything.
    pub action: Option<String>,
}
