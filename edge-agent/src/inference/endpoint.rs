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
//! Predictions run on tokio's blocking pool, one request at a time per
//! connection. A frame longer than [`MAX_FRAME`] gets an error response and the
//! connection is closed; a malformed request gets an error response and the
//! connection stays open. Full description with examples: `docs/inference.md`.

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
        let response = match serde_json::from_slice::<Request>(&frame) {
            // The model runs on the blocking pool, so a long batch does not
            // stall the runtime's other connections.
            Ok(request) => match current() {
                Some(p) => tokio::task::spawn_blocking(move || handle(&p, request))
                    .await
                    .unwrap_or_else(|e| {
                        Response::error("internal", format!("prediction task failed: {e}"))
                    }),
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
        };
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
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let current = current.clone();
                tokio::spawn(async move {
                    let _ = connection(stream, current).await;
                });
            }
        }
    }
}
