//! The local prediction endpoint for apps on the device: a Unix socket.
//!
//! # Schema
//!
//! Each message in either direction is a frame: a `u32` little-endian byte
//! length, then that many bytes of UTF-8 JSON. A connection carries any
//! number of request/response pairs, in order. Requests ([`Request`]):
//!
//! ```json
//! {"op": "predict", "inputs": [[0.1, -0.8, ...], ...]}   // normalised features
//! {"op": "predict_pixels", "pixels": [[0, 255, ...], ...]} // 8-bit pixels
//! {"op": "info"}
//! {"op": "label", "id": 42, "label": 9}   // the true class of prediction 42, once known
//! ```
//!
//! Responses ([`Response`]):
//!
//! ```json
//! {"ok": true, "version": 7, "predictions": [{"id": 42, "class": 9, "label": "Ankle boot", "logits": [...]}]}
//! {"ok": true}                                             // a label recorded
//! {"ok": true, "version": 7, "info": {"sha256": "...", "variant": "int8", "features": 784, "labels": [...]}}
//! {"ok": false, "error": {"kind": "shape", "message": "input has 783 values, ..."}}
//! ```
//!
//! Requests are parsed and predictions run on tokio's blocking pool, one
//! request at a time per connection, so a large request never stalls the
//! agent's runtime thread. A frame longer than [`MAX_FRAME`] gets an error
//! response and the connection is closed; a malformed request gets an error
//! response and the connection stays open. Full description with examples:
//! `docs/inference.md`.
//!
//! Who may connect: only processes of the user that owns the socket file
//! (the agent's user) or root ([`peer_allowed`], checked with the peer's
//! credentials); others get a `forbidden` error and are closed. At most
//! [`MAX_CONNECTIONS`] connections are served at once; more get `busy`. An
//! error accepting one connection (such as running out of descriptors)
//! pauses accepting briefly and never ends the endpoint.

use std::future::Future;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::error::InferenceError;
use super::predictor::{Observer, Predictor};

/// Largest request or response frame, in bytes (8 MiB: a batch of about
/// 1,000 Fashion-MNIST images as JSON).
pub const MAX_FRAME: usize = 8 << 20;

/// Connections served at once; more are answered `busy` and closed.
pub const MAX_CONNECTIONS: usize = 32;

/// Whether a peer running as `uid` may use a socket owned by `owner`: the
/// same user, or root.
pub fn peer_allowed(uid: u32, owner: u32) -> bool {
    uid == owner || uid == 0
}

/// A request to the endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Predict from normalised features, one array per example.
    Predict {
        /// `[batch][features]`.
        inputs: Vec<Vec<f32>>,
    },
    /// Predict from 8-bit pixels, normalised with the model's metadata.
    PredictPixels {
        /// `[batch][features]`.
        pixels: Vec<Vec<u8>>,
    },
    /// Describe the model serving now.
    Info,
    /// The true class of an earlier prediction, for drift monitoring's
    /// accuracy (recent predictions of the serving model only).
    Label {
        /// The prediction's id.
        id: u64,
        /// Its true class index.
        label: usize,
    },
}

/// One example's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Id of this prediction (for a later `label`).
    #[serde(default)]
    pub id: u64,
    /// Predicted class index.
    pub class: usize,
    /// Its name.
    pub label: String,
    /// All logits.
    pub logits: Vec<f32>,
}

/// What `info` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model name (`2nn`, `cnn`, …).
    pub model: String,
    /// `float` or `int8`.
    pub variant: String,
    /// Hex SHA-256 of the artifact.
    pub sha256: String,
    /// Features per example.
    pub features: usize,
    /// Class names.
    pub labels: Vec<String>,
    /// Version kept for rollback, if any.
    pub previous_version: Option<u64>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable kind: `bad_request`, `too_large`, `shape`,
    /// `non_finite`, `no_normalization`, `no_model` (nothing deployed
    /// yet), `label` (a label that cannot be recorded), `internal`.
    pub kind: String,
    /// What happened and what to do.
    pub message: String,
}

/// A response from the endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Model version that answered (absent on errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Answers to `predict` / `predict_pixels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Vec<Prediction>>,
    /// Answer to `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ModelInfo>,
    /// The failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    fn error(kind: &str, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            version: None,
            predictions: None,
            info: None,
            error: Some(ErrorBody {
                kind: kind.into(),
                message: message.into(),
            }),
        }
    }
}

fn kind_of(e: &InferenceError) -> &'static str {
    match e {
        InferenceError::Shape { .. } => "shape",
        InferenceError::NonFinite { .. } => "non_finite",
        InferenceError::NoNormalization => "no_normalization",
        _ => "internal",
    }
}

/// Answers one request with `predictor` (no I/O).
pub fn handle<O: Observer>(predictor: &Predictor<O>, request: Request) -> Response {
    let flat = |rows: &[Vec<f32>]| rows.concat();
    let result = match &request {
        Request::Info => {
            let m = predictor.current();
            let meta = m.meta();
            return Response {
                ok: true,
                version: Some(m.version()),
                predictions: None,
                info: Some(ModelInfo {
                    model: meta.spec.name(),
                    variant: meta.variant.to_string(),
                    sha256: m.sha256().into(),
                    features: m.features(),
                    labels: meta.labels.clone(),
                    previous_version: predictor.versions().1,
                }),
                error: None,
            };
        }
        Request::Label { id, label } => {
            return match predictor.label(*id, *label) {
                Ok(()) => Response {
                    ok: true,
                    version: None,
                    predictions: None,
                    info: None,
                    error: None,
                },
                Err(e) => Response::error("label", e),
            };
        }
        Request::Predict { inputs } => {
            check_rows(inputs, predictor).and_then(|()| predictor.answer(&flat(inputs)))
        }
        Request::PredictPixels { pixels } => {
            check_rows(pixels, predictor).and_then(|()| predictor.answer_pixels(&pixels.concat()))
        }
    };
    match result {
        Ok((model, p)) => {
            let labels = &model.meta().labels;
            let predictions = (0..p.len())
                .map(|i| {
                    let row = p.row(i);
                    let class = fleet_models::train::argmax(row);
                    Prediction {
                        id: p.first_id + i as u64,
                        class,
                        label: labels.get(class).cloned().unwrap_or_default(),
                        logits: row.to_vec(),
                    }
                })
                .collect();
            Response {
                ok: true,
                version: Some(p.version),
                predictions: Some(predictions),
                info: None,
                error: None,
            }
        }
        Err(e) => Response::error(kind_of(&e), e.to_string()),
    }
}

/// Every row must have the model's width (a flat length check alone would
/// accept ragged rows that happen to add up).
fn check_rows<T, O: Observer>(
    rows: &[Vec<T>],
    predictor: &Predictor<O>,
) -> Result<(), InferenceError> {
    let features = predictor.current().features();
    match rows.iter().find(|r| r.len() != features) {
        Some(r) => Err(InferenceError::Shape {
            features,
            found: r.len(),
        }),
        None if rows.is_empty() => Err(InferenceError::Shape { features, found: 0 }),
        None => Ok(()),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame(stream: &mut UnixStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {MAX_FRAME}; send smaller batches"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Writes one frame.
pub async fn write_frame(stream: &mut UnixStream, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    stream.write_all(&len.to_le_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Sends `request` on `stream` and reads the response (a client helper).
pub async fn call(stream: &mut UnixStream, request: &Request) -> io::Result<Response> {
    let body = serde_json::to_vec(request).map_err(io::Error::other)?;
    write_frame(stream, &body).await?;
    let frame = read_frame(stream).await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "endpoint closed the connection",
        )
    })?;
    serde_json::from_slice(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn connection<O: Observer>(
    mut stream: UnixStream,
    current: impl Fn() -> Option<Arc<Predictor<O>>>,
) -> io::Result<()> {
    loop {
        let frame = match read_frame(&mut stream).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let r = Response::error("too_large", e.to_string());
                let body = serde_json::to_vec(&r).expect("responses serialise");
                write_frame(&mut stream, &body).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // Parsing (up to MAX_FRAME bytes of JSON) and the model both run on
        // the blocking pool, so that neither stalls the runtime's thread.
        let predictor = current();
        let response = tokio::task::spawn_blocking(move || {
            match serde_json::from_slice::<Request>(&frame) {
                Ok(request) => match predictor {
                    Some(p) => handle(&p, request),
                    None => Response::error(
                        "no_model",
                        "no model is deployed to this device yet; the agent serves one as soon \
                         as the coordinator deploys it (coordinator models deploy)",
                    ),
                },
                Err(e) => Response::error(
                    "bad_request",
                    format!("not a valid request ({e}); see docs/inference.md for the schema"),
                ),
            }
        })
        .await
        .unwrap_or_else(|e| Response::error("internal", format!("prediction task failed: {e}")));
        let body = serde_json::to_vec(&response).expect("responses serialise");
        write_frame(&mut stream, &body).await?;
    }
}

/// Serves `predictor` on `listener` until `shutdown` completes. Each
/// connection runs in its own task; a connection's I/O error ends only that
/// connection.
pub async fn serve<O: Observer>(
    listener: UnixListener,
    predictor: Arc<Predictor<O>>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_current(listener, move || Some(Arc::clone(&predictor)), shutdown).await
}

/// Like [`serve`], taking the predictor from `current` for every request:
/// while it returns `None` (no model yet), requests get a `no_model` error
/// and the connection stays open.
pub async fn serve_current<O: Observer>(
    listener: UnixListener,
    current: impl Fn() -> Option<Arc<Predictor<O>>> + Clone + Send + 'static,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = match listener.local_addr()?.as_pathname() {
        Some(path) => std::fs::metadata(path)?.uid(),
        // An unnamed socket has no owner to compare with: root only.
        None => 0,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = std::time::Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let mut stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of descriptors or memory: wait and accept again.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                backoff = std::time::Duration::from_millis(10);
                let refusal = match stream.peer_cred() {
                    Ok(cred) if peer_allowed(cred.uid(), owner) => None,
                    Ok(cred) => Some(Response::error(
                        "forbidden",
                        format!(
                            "user {} may not use this socket; run as the agent's user (uid {owner})",
                            cred.uid()
                        ),
                    )),
                    Err(e) => Some(Response::error(
                        "forbidden",
                        format!("the peer's credentials are unknown: {e}"),
                    )),
                };
                let slot = match (refusal, Arc::clone(&slots).try_acquire_owned()) {
                    (None, Ok(slot)) => slot,
                    (refusal, _) => {
                        let r = refusal.unwrap_or_else(|| Response::error(
                            "busy",
                            format!("{MAX_CONNECTIONS} connections are served already; try again later"),
                        ));
                        tokio::spawn(async move {
                            let body = serde_json::to_vec(&r).expect("responses serialise");
                            // A peer that does not read cannot hold the task.
                            let write = write_frame(&mut stream, &body);
                            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), write).await;
                        });
                        continue;
                    }
                };
                let current = current.clone();
                tokio::spawn(async move {
                    let _ = connection(stream, current).await;
                    drop(slot);
                });
            }
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::inference::predictor::NoObserver;

    #[test]
    fn only_the_owner_and_root_may_connect() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 0));
    }

    async fn ask(stream: &mut UnixStream, body: &[u8]) -> Response {
        write_frame(stream, body).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(60), read_frame(stream))
            .await
            .expect("an answer within 60 s")
            .unwrap()
            .expect("a frame, not the end of the stream");
        serde_json::from_slice(&frame).unwrap()
    }

    fn kind(r: &Response) -> &str {
        r.error.as_ref().map_or("", |e| e.kind.as_str())
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_told_busy_and_a_freed_slot_serves_again() {
        let dir = std::env::temp_dir().join(format!("fleet-endpoint-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("predict.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let none = || None::<Arc<Predictor<NoObserver>>>;
        tokio::spawn(serve_current(listener, none, std::future::pending()));
        let info = br#"{"op": "info"}"#;

        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = UnixStream::connect(&path).await.unwrap();
            assert_eq!(kind(&ask(&mut s, info).await), "no_model");
            held.push(s);
        }
        let mut extra = UnixStream::connect(&path).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut extra))
            .await
            .expect("the refusal within 60 s")
            .unwrap()
            .expect("a busy answer");
        let busy: Response = serde_json::from_slice(&frame).unwrap();
        assert_eq!(kind(&busy), "busy");

        // A nesting bomb is refused as a bad request without ending the connection.
        let bomb = vec![b'['; 1 << 20];
        assert_eq!(kind(&ask(&mut held[0], &bomb).await), "bad_request");
        assert_eq!(kind(&ask(&mut held[0], info).await), "no_model");

        // Closing one connection frees its slot.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut s = UnixStream::connect(&path).await.unwrap();
            write_frame(&mut s, info).await.unwrap();
            let frame = read_frame(&mut s).await.unwrap().unwrap();
            let r: Response = serde_json::from_slice(&frame).unwrap();
            if kind(&r) == "no_model" {
                break;
            }
            assert_eq!(kind(&r), "busy");
            assert!(Instant::now() < deadline, "no slot freed within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
