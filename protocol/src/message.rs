//! The messages of the protocol.
//!
//! A session on one QUIC connection: the agent sends [`AgentMessage::Hello`],
//! the coordinator answers [`CoordinatorMessage::HelloAck`] (or an error and
//! closes). The agent then checks in; the coordinator either hands it a
//! [`Plan`] for the open round or tells it when to come back (pace
//! steering). Model artifacts are fetched and updates uploaded in chunks
//! ([`crate::transfer`]), each object named by its SHA-256.
//!
//! A device without a certificate may only enroll: it connects without a
//! client certificate and sends [`AgentMessage::Enroll`].
//!
//! Identity is not in the messages: it is the device certificate of the
//! mutual-TLS connection.

use std::fmt;

use fleet_aggregation::codec::Codec;
use fleet_aggregation::privacy::DpConfig;
use fleet_drift::{SketchSpec, Summary};
use fleet_models::export::Variant;
use fleet_models::{LayoutFingerprint, ModelSpec, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// SHA-256 of an object's bytes: its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        ObjectId(Sha256::digest(bytes).into())
    }

    /// Parses the 64 hex digits [`Display`](fmt::Display) writes (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ObjectId(out))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", &self.to_string()[..16])
    }
}

/// The model object format: flat parameters as little-endian f32.
pub fn params_to_bytes(p: &[f32]) -> Vec<u8> {
    p.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Parses the model object format; `None` when the length is not a multiple of 4.
pub fn bytes_to_params(b: &[u8]) -> Option<Vec<f32>> {
    b.len().is_multiple_of(4).then(|| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// An object and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    /// SHA-256 of the bytes.
    pub id: ObjectId,
    /// Size in bytes.
    pub size: u64,
}

/// What a device can do, reported at check-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Memory the agent may use for training, in MiB.
    pub memory_mib: u32,
    /// Whether the device's eligibility rules (power, idle, unmetered network) hold now.
    pub eligible: bool,
}

/// The work of one round for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Task.
    pub task: u64,
    /// Round within the task.
    pub round: u64,
    /// The global model's parameters (f32 little-endian, flat layout).
    pub model: ObjectRef,
    /// Architecture.
    pub spec: ModelSpec,
    /// Local training.
    pub train: TrainConfig,
    /// Differential privacy to apply before upload.
    pub dp: Option<DpConfig>,
    /// How to encode the update.
    pub codec: Codec,
    /// Milliseconds from now by which the update must be uploaded.
    pub report_within_ms: u64,
    /// Secure aggregation: the round's protocol context and quantiser
    /// (`None`: the update is uploaded as it is).
    pub secure: Option<Box<SecurePlan>>,
}

/// What a device of a secure round needs besides the plan's training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecurePlan {
    /// The SecAgg+ round (task, round, attempt and settings).
    pub context: fleet_secagg::Context,
    /// How the update becomes integers (clip, rotation, scale, noise).
    pub quantiser: fleet_secagg::quantise::Quantiser,
    /// Longest wait of each stage.
    pub stage_timeout_ms: u64,
}

impl SecurePlan {
    /// The mechanism a round closed with `survivors` devices is charged
    /// as: Skellam noise with each survivor's share `λ` on the integer sum,
    /// whose sensitivity the quantiser bounds (its rounding included).
    pub fn mechanism(
        &self,
        survivors: usize,
    ) -> fleet_aggregation::privacy::accountant::skellam::Skellam {
        let (l1, l2) = self.quantiser.sensitivity();
        fleet_aggregation::privacy::accountant::skellam::Skellam {
            l1,
            l2,
            mu: self.quantiser.total_mu(survivors),
        }
    }
}

/// Describes an update before its bytes are uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateMeta {
    /// Task.
    pub task: u64,
    /// Round.
    pub round: u64,
    /// Layout the update was computed for.
    pub fingerprint: LayoutFingerprint,
    /// The encoded update.
    pub object: ObjectRef,
    /// Local examples (the update's weight); `None` in a private task, where
    /// every update weighs the same and the count would be seen in the
    /// clear.
    pub examples: Option<u64>,
    /// Mean local training loss; `None` in a private task.
    pub train_loss: Option<f32>,
}

/// Messages from an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message: protocol versions and the agent's software version.
    Hello {
        /// Version spoken.
        version: u16,
        /// Oldest version accepted.
        min_version: u16,
        /// Agent software version, for logs.
        software: String,
    },
    /// Asks for work.
    CheckIn {
        /// What the device can do now.
        capabilities: Capabilities,
    },
    /// Asks for bytes of an object, from `offset` (resuming a download).
    Fetch {
        /// The object.
        object: ObjectId,
        /// First byte wanted.
        offset: u64,
    },
    /// Announces an update (or resumes its upload: the answer says how much arrived).
    BeginUpload(UpdateMeta),
    /// Enrolls a new device (the only request allowed without a device
    /// certificate): a one-time token from an administrator and a
    /// certificate signing request for a key the device generated itself.
    Enroll {
        /// The enrollment token.
        token: String,
        /// DER-encoded PKCS#10 request.
        csr: Vec<u8>,
    },
    /// Asks which model version the fleet should serve.
    GetDeployment,
    /// Bytes of an announced update.
    UploadChunk {
        /// The update.
        object: ObjectId,
        /// Position of `data`.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Asks for the drift sketch of the deployed model.
    GetDriftSpec,
    /// The drift summary of one reporting window.
    DriftReport(DriftReport),
    /// Asks for a new certificate for this device (the one the connection
    /// presented is about to expire): a signing request for a new key the
    /// device generated. Since version 4.
    Renew {
        /// DER-encoded PKCS#10 request.
        csr: Vec<u8>,
    },
    /// A secure-aggregation message of this device for `round` of `task`
    /// (the advertisement of its keys, its encrypted shares or its
    /// reveal), or, with none, a poll for the coordinator's next message.
    /// The masked input is too large for one frame: it goes as
    /// [`AgentMessage::SecureChunk`]s. Since version 6.
    Secure {
        /// The task.
        task: u64,
        /// The round.
        round: u64,
        /// The message, or `None` to poll.
        message: Option<fleet_secagg::DeviceMessage>,
    },
    /// Bytes of this device's masked input for `round` of `task`, in order
    /// from offset 0 (a chunk at offset 0 starts it again); the input is
    /// `4 · length` bytes, each word little-endian. Since version 6.
    SecureChunk {
        /// The task.
        task: u64,
        /// The round.
        round: u64,
        /// Position of `data`.
        offset: u64,
        /// The bytes (at most [`crate::transfer::CHUNK_SIZE`]).
        data: Vec<u8>,
    },
}

/// Messages from the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    /// Accepts the hello; the session speaks `version`.
    HelloAck {
        /// Version both sides speak.
        version: u16,
    },
    /// Work for the current round.
    Plan(Plan),
    /// No work now: check in again after this many milliseconds.
    ComeBackLater {
        /// Delay before the next check-in.
        after_ms: u64,
    },
    /// Bytes of an object.
    Chunk {
        /// The object.
        object: ObjectId,
        /// Position of `data`.
        offset: u64,
        /// Total size of the object.
        total: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// How many bytes of an upload the coordinator holds (to resume from).
    UploadProgress {
        /// The update.
        object: ObjectId,
        /// Bytes held.
        received: u64,
    },
    /// The update was verified and accepted into the round.
    UploadAccepted {
        /// The update.
        object: ObjectId,
    },
    /// Enrollment succeeded: the device's identity and certificate.
    Enrolled {
        /// The device's id.
        device: u64,
        /// Its certificate (DER), signed by the coordinator's CA.
        certificate: Vec<u8>,
    },
    /// The model version deployed to the fleet, if any.
    Deployment(Option<Deployment>),
    /// A refusal.
    Error(WireError),
    /// How to summarise predictions for drift monitoring (none: not monitored).
    DriftSpec(Option<DriftSpecInfo>),
    /// A drift summary was merged into window `window`.
    DriftAccepted {
        /// The open window.
        window: u64,
    },
    /// The answer to `Renew`: the device's new certificate (DER), for the
    /// key of the request. Since version 4.
    Renewed {
        /// The certificate, signed by the coordinator's CA.
        certificate: Vec<u8>,
    },
    /// The answer to `Secure` and `SecureChunk`: the coordinator's next
    /// secure-aggregation message for the device when one is waiting, and
    /// otherwise when to poll again. Since version 6.
    Secure {
        /// The message, if one is waiting.
        message: Option<fleet_secagg::ServerMessage>,
        /// Poll again after this many milliseconds (when `message` is `None`).
        after_ms: u64,
    },
}

/// A model version deployed for on-device use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Deployment number (increases with every deploy or rollback).
    pub version: u64,
    /// The model's parameters (f32 little-endian, flat layout).
    pub model: ObjectRef,
    /// Architecture.
    pub spec: ModelSpec,
    /// The inference artifact agents serve for this deployment.
    pub artifact: DeployedArtifact,
}

/// The ONNX inference artifact of a deployment (`fleet_models::export`).
///
/// An agent fetches `object` with [`AgentMessage::Fetch`] and accepts it only
/// if its SHA-256 is `object.id`, its size `object.size`, and the metadata
/// inside the file names this `variant`, `model_version` and the
/// deployment's `spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedArtifact {
    /// The ONNX file: its SHA-256 and size.
    pub object: ObjectRef,
    /// Float or int8 (the variant the task that produced the model chose).
    pub variant: Variant,
    /// Global model version written in the artifact's metadata: the round
    /// that produced the model (0 for a task's initial model).
    pub model_version: u64,
}

/// The drift sketch of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSpecInfo {
    /// Deployment the sketch belongs to.
    pub deployment: u64,
    /// Features and bins.
    pub spec: SketchSpec,
    /// Length of a reporting window (seconds): send one summary per window.
    pub window_secs: u64,
}

/// A device's drift summary for one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Deployment whose predictions are summarised.
    pub deployment: u64,
    /// Cohort tags of the device (region, hardware class, group), at most 8.
    pub tags: Vec<String>,
    /// The counts.
    pub summary: Summary,
}

#[cfg(test)]
mod tests {
    use super::ObjectId;

    #[test]
    fn object_ids_round_trip_through_hex() {
        let id = ObjectId::of(b"model bytes");
        let hex = id.to_string();
        assert_eq!(ObjectId::from_hex(&hex), Some(id));
        assert_eq!(ObjectId::from_hex(&hex.to_uppercase()), Some(id));
        assert_eq!(ObjectId::from_hex(&hex[..63]), None, "too short");
        assert_eq!(ObjectId::from_hex(&format!("{hex}0")), None, "too long");
        let bad = format!("g{}", &hex[1..]);
        assert_eq!(ObjectId::from_hex(&bad), None, "not hex");
        // `from_str_radix` alone would take a sign.
        let signed = format!("+{}", &hex[1..]);
        assert_eq!(ObjectId::from_hex(&signed), None, "a sign is not a digit");
        // A multi-byte character must not split a pair of digits.
        let wide = format!("é{}", &hex[2..]);
        assert_eq!(ObjectId::from_hex(&wide), None);
    }
}
