//! One agent session over one QUIC connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleet_aggregation::privacy::privatize_client_update;
use fleet_models::{Backend, Dataset, train_local};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, ObjectRef, Plan, UpdateMeta,
    bytes_to_params,
};
use fleet_protocol::stream::{StreamError, recv, send};
use fleet_protocol::transfer::{Assembler, chunks};
use fleet_protocol::{MAX_FRAME, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION, WireError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting failed.
    #[error("cannot connect to the coordinator: {0}")]
    Connect(String),
    /// The stream broke.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The coordinator refused a request.
    #[error("coordinator refused: {0}")]
    Refused(WireError),
    /// The coordinator sent something out of order.
    #[error("unexpected message from the coordinator: {0}")]
    Unexpected(String),
    /// Local training or encoding failed.
    #[error("local work failed: {0}")]
    Local(String),
}

/// What a session did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionReport {
    /// Rounds whose update the coordinator accepted.
    pub accepted: Vec<u64>,
    /// Update bytes uploaded.
    pub bytes_up: u64,
    /// Model bytes downloaded.
    pub bytes_down: u64,
}

/// The device's local data: a data set and the examples that belong to it.
#[derive(Debug, Clone)]
pub struct LocalData {
    /// The examples.
    pub dataset: Arc<Dataset>,
    /// Which of them this device holds.
    pub indices: Arc<Vec<usize>>,
}

struct Link {
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
}

impl Link {
    async fn call(&mut self, msg: &AgentMessage) -> Result<CoordinatorMessage, SessionError> {
        send(&mut self.tx, msg).await?;
        self.next().await
    }

    async fn next(&mut self) -> Result<CoordinatorMessage, SessionError> {
        match recv::<CoordinatorMessage>(&mut self.rx, MAX_FRAME).await? {
            Some(CoordinatorMessage::Error(e)) => Err(SessionError::Refused(e)),
            Some(m) => Ok(m),
            None => Err(SessionError::Stream(StreamError::Closed)),
        }
    }
}

/// Runs rounds until the coordinator ends its task (closing the connection
/// with code 0) or `max_rounds` updates were accepted.
pub async fn session(
    endpoint: &quinn::Endpoint,
    coordinator: SocketAddr,
    server_name: &str,
    data: LocalData,
    max_rounds: usize,
) -> Result<SessionReport, SessionError> {
    let conn = endpoint
        .connect(coordinator, server_name)
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .await
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    let (tx, rx) = conn
        .open_bi()
        .await
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    let mut link = Link { tx, rx };
    match link
        .call(&AgentMessage::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_SUPPORTED_VERSION,
            software: concat!("fleet-edge-agent ", env!("CARGO_PKG_VERSION")).into(),
        })
        .await?
    {
        CoordinatorMessage::HelloAck { .. } => {}
        other => return Err(SessionError::Unexpected(format!("{other:?}"))),
    }
    let mut report = SessionReport::default();
    while report.accepted.len() < max_rounds {
        let reply = link
            .call(&AgentMessage::CheckIn {
                capabilities: Capabilities {
                    memory_mib: 256,
                    eligible: true,
                },
            })
            .await;
        match reply {
            Ok(CoordinatorMessage::Plan(plan)) => {
                let round = plan.round;
                if work(&mut link, plan, &data, &mut report).await? {
                    report.accepted.push(round);
                }
            }
            Ok(CoordinatorMessage::ComeBackLater { after_ms }) => {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
            }
            Ok(other) => return Err(SessionError::Unexpected(format!("{other:?}"))),
            // The coordinator finished its task and closed the connection (code 0).
            Err(SessionError::Stream(_)) if finished(&conn) => return Ok(report),
            Err(e) => return Err(e),
        }
    }
    conn.close(0u32.into(), b"done");
    Ok(report)
}

fn finished(conn: &quinn::Connection) -> bool {
    matches!(conn.close_reason(), Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == 0u32.into())
}

async fn fetch(
    link: &mut Link,
    model: ObjectRef,
    report: &mut SessionReport,
) -> Result<Vec<f32>, SessionError> {
    let mut asm = Assembler::new(model, 1 << 31).map_err(|e| SessionError::Local(e.to_string()))?;
    send(
        &mut link.tx,
        &AgentMessage::Fetch {
            object: model.id,
            offset: 0,
        },
    )
    .await?;
    while !asm.is_complete() {
        match link.next().await? {
            CoordinatorMessage::Chunk {
                object,
                offset,
                data,
                ..
            } if object == model.id => {
                report.bytes_down += data.len() as u64;
                asm.accept(offset, &data)
                    .map_err(|e| SessionError::Local(e.to_string()))?;
            }
            other => return Err(SessionError::Unexpected(format!("{other:?}"))),
        }
    }
    let bytes = asm
        .finish()
        .map_err(|e| SessionError::Local(e.to_string()))?;
    bytes_to_params(&bytes).ok_or_else(|| {
        SessionError::Local(format!(
            "model object of {} bytes is not f32 values",
            bytes.len()
        ))
    })
}

/// Trains on a plan and uploads the update; true when the coordinator accepted it.
async fn work(
    link: &mut Link,
    plan: Plan,
    data: &LocalData,
    report: &mut SessionReport,
) -> Result<bool, SessionError> {
    let global = fetch(link, plan.model, report).await?;
    let (spec, train, dp, codec) = (plan.spec.clone(), plan.train, plan.dp, plan.codec);
    let local = data.clone();
    let (bytes, examples, loss) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let view = local
            .dataset
            .subset(&local.indices)
            .map_err(|e| e.to_string())?;
        let out = train_local(&spec, &global, view, &train, Backend::DEFAULT)
            .map_err(|e| e.to_string())?;
        let mut delta = out.delta(&global);
        if let Some(dp) = &dp {
            privatize_client_update(&mut delta, dp).map_err(|e| e.to_string())?;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(train.seed ^ plan.round);
        let bytes = codec.encode(&delta, &mut rng).map_err(|e| e.to_string())?;
        Ok((bytes, out.examples, out.mean_loss))
    })
    .await
    .map_err(|e| SessionError::Local(e.to_string()))?
    .map_err(SessionError::Local)?;
    let object = ObjectRef {
        id: ObjectId::of(&bytes),
        size: bytes.len() as u64,
    };
    let meta = UpdateMeta {
        task: plan.task,
        round: plan.round,
        fingerprint: plan.spec.layout().fingerprint(),
        object,
        examples: examples as u64,
        train_loss: loss,
    };
    let from = match link.call(&AgentMessage::BeginUpload(meta)).await {
        Ok(CoordinatorMessage::UploadProgress { received, .. }) => received,
        // The round closed while this device trained: a straggler.
        Err(SessionError::Refused(_)) => return Ok(false),
        Ok(other) => return Err(SessionError::Unexpected(format!("{other:?}"))),
        Err(e) => return Err(e),
    };
    for (offset, chunk) in chunks(&bytes, from) {
        report.bytes_up += chunk.len() as u64;
        let reply = link
            .call(&AgentMessage::UploadChunk {
                object: object.id,
                offset,
                data: chunk.to_vec(),
            })
            .await;
        match reply {
            Ok(CoordinatorMessage::UploadProgress { .. }) => {}
            Ok(CoordinatorMessage::UploadAccepted { .. }) => return Ok(true),
            Err(SessionError::Refused(_)) => return Ok(false),
            Ok(other) => return Err(SessionError::Unexpected(format!("{other:?}"))),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
