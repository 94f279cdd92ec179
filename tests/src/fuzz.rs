//! Fuzz target bodies: the code that parses bytes a peer, a device or a file
//! controls, driven by arbitrary input.
//!
//! Each `pub fn <target>(data: &[u8])` is the whole body of one cargo-fuzz
//! target (`fuzz/fuzz_targets/<target>.rs` only forwards to it), and the
//! stable test `tests/tests/fuzz_replay.rs` replays every committed corpus
//! and regression input through the same function, so a regression shows
//! in `cargo test` without a nightly toolchain.
//!
//! A body panics only when an invariant is broken: the parsers under test
//! must answer hostile bytes with an error value, and what they accept must
//! hold together (re-encoding round-trips, lengths bounded by the input,
//! models that agree with a reference implementation). [`seeds`] makes the
//! valid inputs the corpora start from.
//!
//! | target | code under test |
//! | --- | --- |
//! | [`frame`] | `fleet_protocol::frame` decoding of every wire and admin message type |
//! | [`update_codec`] | `fleet_aggregation::codec::decode` and the admission check after it |
//! | [`chunk_assembler`] | `fleet_protocol::transfer::Assembler` against a reference model |
//! | [`drift_summary`] | drift reports into the coordinator's `DriftMonitor`; sketch specs into the agent's `Sketcher` |
//! | [`enroll_csr`] | `CertificateAuthority::issue_device` on the request an enrolling device sends |
//! | [`idx`] | `fleet_models::data::idx` (gzip, IDX, and two files into a data set) |
//! | [`fleet_file`] | `fleet_sim::fleet::Fleet::from_toml` and what a valid fleet derives |
//! | [`onnx_model`] | `fleet_edge_agent::inference::Model::load` (metadata, tract parse, plan, trial run) |

use std::fmt::Debug;
use std::sync::OnceLock;

use fleet_aggregation::codec::{self, Codec, ValueCodec};
use fleet_aggregation::{Admission, Update};
use fleet_coordinator::drift::{DeviceSummary, DriftMonitor, MonitorConfig, RetrainPolicy};
use fleet_drift::{SketchSpec, Sketcher, Summary, SummaryBuilder};
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::frame::{FrameDecoder, MAX_FRAME, decode, encode};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, ObjectId, ObjectRef};
use fleet_protocol::task::TaskSpec;
use fleet_protocol::tls::{CertificateAuthority, Role, role_of};
use fleet_protocol::transfer::{Assembler, chunks};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A target body.
pub type Body = fn(&[u8]);

/// Every target, by name: the directories under `fuzz/corpus/` and
/// `fuzz/regressions/`, and the files in `fuzz/fuzz_targets/`.
pub const TARGETS: [(&str, Body); 8] = [
    ("frame", frame),
    ("update_codec", update_codec),
    ("chunk_assembler", chunk_assembler),
    ("drift_summary", drift_summary),
    ("enroll_csr", enroll_csr),
    ("idx", idx),
    ("fleet_file", fleet_file),
    ("onnx_model", onnx_model),
];

// ---------------------------------------------------------------------------
// frame

/// Frames of one message type: the first byte picks the type (agent,
/// coordinator, admin request, admin response, task spec), the rest is a
/// byte stream. It is fed to a [`FrameDecoder`] whole and again in pieces
/// (sizes from the second byte); both must yield the same messages and
/// errors. Every decoded message must re-encode to a payload no longer than
/// the one it came from, decode again, and re-encode to the same bytes; the
/// decoder must never hold more than it was given.
pub fn frame(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => frames::<AgentMessage>(rest, |m| {
            if let AgentMessage::DriftReport(r) = m {
                let _ = r.summary.check(&drift_spec());
            }
        }),
        1 => frames::<CoordinatorMessage>(rest, |_| {}),
        2 => frames::<AdminRequest>(rest, |m| {
            if let AdminRequest::CreateTask(spec) = m {
                // What the coordinator runs on a task it is given.
                let _ = spec.validate();
            }
        }),
        3 => frames::<AdminResponse>(rest, |_| {}),
        _ => frames::<TaskSpec>(rest, |spec| {
            let _ = spec.validate();
        }),
    }
}

/// What a decoder said for each frame: the re-encoded message or the error text.
type Outcome = Result<Vec<u8>, String>;

fn frames<T>(data: &[u8], check: impl Fn(&T))
where
    T: Serialize + DeserializeOwned + Debug,
{
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let whole = drain::<T>(&[stream], &check);
    // Pieces of 1..=64 bytes, sizes cycling from the split byte.
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut size = usize::from(split % 64) + 1;
    while at < stream.len() {
        let end = (at + size).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
        size = size % 64 + 1;
    }
    let pieced = drain::<T>(&pieces, &check);
    assert_eq!(
        whole, pieced,
        "feeding the stream in pieces changed what was decoded"
    );
}

fn drain<T>(pieces: &[&[u8]], check: &impl Fn(&T)) -> Vec<Outcome>
where
    T: Serialize + DeserializeOwned + Debug,
{
    let mut dec = FrameDecoder::new(MAX_FRAME);
    let mut out = Vec::new();
    let mut given = 0usize;
    let mut taken = 0usize;
    for piece in pieces {
        given += piece.len();
        if let Err(e) = dec.push(piece) {
            // Refused at the header: the connection ends here.
            out.push(Err(e.to_string()));
            return out;
        }
        loop {
            let before = dec.pending();
            assert!(
                before <= given - taken,
                "decoder holds {before} bytes, only {} unconsumed",
                given - taken
            );
            match dec.next_message::<T>() {
                Ok(None) => break,
                Ok(Some(msg)) => {
                    let used = before - dec.pending();
                    taken += used;
                    out.push(Ok(round_trip(&msg, used - 4, check)));
                }
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }
    out
}

/// Checks a decoded message; returns its canonical frame.
fn round_trip<T>(msg: &T, payload_len: usize, check: &impl Fn(&T)) -> Vec<u8>
where
    T: Serialize + DeserializeOwned + Debug,
{
    check(msg);
    let again = encode(msg);
    assert!(
        again.len() - 4 <= payload_len,
        "{payload_len}-byte payload re-encodes to {} bytes: {msg:?}",
        again.len() - 4
    );
    assert_eq!(
        u32::from_le_bytes(again[..4].try_into().expect("4 bytes")) as usize,
        again.len() - 4,
        "frame header does not match its payload"
    );
    let decoded: T = decode(&again[4..])
        .unwrap_or_else(|e| panic!("re-encoded message does not decode ({e}): {msg:?}"));
    assert_eq!(
        encode(&decoded),
        again,
        "decode(encode(m)) re-encodes differently: {msg:?}"
    );
    again
}

// ---------------------------------------------------------------------------
// update_codec

/// Largest model length the codec target decodes for.
const CODEC_MAX_LEN: usize = 1 << 16;

/// An encoded update as the coordinator receives it, decoded for the length
/// its header claims (capped at [`CODEC_MAX_LEN`]; in the coordinator the
/// length is the model's). An accepted update has exactly that many values,
/// no more than the input's bytes can carry; f32 updates re-encode to the
/// same bytes and f16 ones (without NaN) too; int8 values are multiples of
/// their chunk's scale within 128 of it; top-k keeps at most `k` non-zero
/// values. Re-encoding the decoded values with the same codec decodes again
/// to the same length. What passes the coordinator's admission is finite.
pub fn update_codec(data: &[u8]) {
    let claimed = data
        .get(1..5)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .unwrap_or(0);
    let expected = if claimed <= CODEC_MAX_LEN {
        claimed
    } else {
        CODEC_MAX_LEN
    };
    let Ok(values) = codec::decode(data, expected) else {
        return;
    };
    assert_eq!(values.len(), expected, "decoded length is not the model's");
    let body = data.len() - 5;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    match data[0] {
        1 => {
            assert_eq!(body, 4 * expected, "f32 update of the wrong size accepted");
            let again = Codec::F32.encode(&values, &mut rng).expect("f32 encodes");
            assert_eq!(again, data, "f32 update does not re-encode to its bytes");
        }
        2 => {
            assert_eq!(body, 2 * expected, "f16 update of the wrong size accepted");
            if values.iter().all(|v| !v.is_nan()) {
                let again = Codec::F16.encode(&values, &mut rng).expect("f16 encodes");
                assert_eq!(again, data, "f16 update does not re-encode to its bytes");
            }
        }
        3 => {
            let chunk = u32::from_le_bytes(data[5..9].try_into().expect("4 bytes")) as usize;
            assert!(chunk > 0);
            let scales = expected.div_ceil(chunk);
            assert_eq!(body, 4 + expected + 4 * scales, "int8 size");
            for (c, vals) in values.chunks(chunk).enumerate() {
                let at = 9 + c * (4 + chunk);
                let scale = f32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                assert!(scale.is_finite() && scale >= 0.0, "scale {scale} accepted");
                for &v in vals {
                    let q = v / scale;
                    assert!(
                        v == 0.0 || (q.abs() <= 128.5 && !v.is_nan()),
                        "int8 value {v} with scale {scale}"
                    );
                }
            }
            if values.iter().all(|v| v.is_finite()) {
                let codec = Codec::Int8 {
                    chunk: chunk as u32,
                };
                let again = codec.encode(&values, &mut rng).expect("int8 encodes");
                assert_eq!(again.len(), data.len(), "int8 re-encodes to another size");
                let back = codec::decode(&again, expected).expect("re-encoded int8 decodes");
                assert_eq!(back.len(), expected);
            }
        }
        4 => {
            let k = u32::from_le_bytes(data[5..9].try_into().expect("4 bytes")) as usize;
            assert!(k <= expected, "top-k keeps {k} of {expected}");
            let nonzero = values.iter().filter(|v| **v != 0.0).count();
            assert!(nonzero <= k, "{nonzero} values set by a top-{k} update");
            // Each kept value costs an index and at least one byte.
            assert!(5 * k < body.max(1) || k == 0, "top-{k} in {body} bytes");
            let inner = match data[9] {
                1 => ValueCodec::F32,
                2 => ValueCodec::F16,
                _ => ValueCodec::Int8,
            };
            if k > 0 && values.iter().all(|v| v.is_finite()) {
                let codec = Codec::TopK {
                    fraction: k as f32 / expected as f32,
                    values: inner,
                };
                let again = codec.encode(&values, &mut rng).expect("top-k encodes");
                let back = codec::decode(&again, expected).expect("re-encoded top-k decodes");
                assert_eq!(back.len(), expected);
            }
        }
        tag => panic!("codec tag {tag} decoded"),
    }
    // The coordinator's admission after decoding.
    let fingerprint = fleet_models::LayoutFingerprint([0; 32]);
    let admission = Admission {
        fingerprint,
        len: expected,
        max_norm: None,
    };
    let update = Update {
        fingerprint,
        values: &values,
        weight: 1.0,
    };
    if let Ok(norm) = admission.check(&update) {
        assert!(norm.is_finite() && norm >= 0.0, "admitted norm {norm}");
        assert!(
            values.iter().all(|v| v.is_finite()),
            "admitted a non-finite value"
        );
    }
}

// ---------------------------------------------------------------------------
// chunk_assembler

/// Largest object the chunk target transfers (hashing dominates its cost).
const CHUNK_OBJECT_MAX: usize = 4096;

/// A transfer driven by the input against a reference model of the
/// assembler. Header: object size (u16, at most [`CHUNK_OBJECT_MAX`]), size limit (u16), a content seed,
/// held bytes to resume with, and whether the announced hash is the
/// object's. Then operations of 5 bytes: kind, offset (u16), length (u16);
/// kinds send the object's true bytes, corrupted bytes, an offset near
/// `u64::MAX`, the rest of the object through [`chunks`], or try to finish.
/// Every accept must succeed exactly when the model says so and leave
/// exactly the model's bytes held; `finish` must return the object exactly
/// when all of it arrived and its hash is the announced one.
pub fn chunk_assembler(data: &[u8]) {
    if data.len() < 7 {
        return;
    }
    let size = usize::from(u16::from_le_bytes([data[0], data[1]])) % (CHUNK_OBJECT_MAX + 1);
    let limit = u64::from(u16::from_le_bytes([data[2], data[3]]));
    let seed = data[4];
    let resume = usize::from(data[5]) * 64;
    let flags = data[6];
    let object: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect();
    let id = if flags & 1 == 0 {
        ObjectId::of(&object)
    } else {
        ObjectId::of(&data[..7])
    };
    let target = ObjectRef {
        id,
        size: size as u64,
    };
    let created = if flags & 2 != 0 {
        let held = object[..resume.min(size)].to_vec();
        Assembler::resume(target, limit, held)
    } else {
        Assembler::new(target, limit)
    };
    if target.size > limit {
        assert!(created.is_err(), "object above the limit accepted");
        return;
    }
    let mut asm = created.expect("an object within the limit is accepted");
    let mut model: Vec<u8> = asm.held().to_vec();
    assert!(model.len() <= size);
    assert_eq!(model, object[..model.len()], "resumed with other bytes");
    for op in data[7..].chunks_exact(5) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let len = usize::from(u16::from_le_bytes([op[3], op[4]]));
        match op[0] % 5 {
            0 | 1 => {
                let start = (offset as usize).min(size);
                let end = (start + len).min(size + 8);
                let mut bytes: Vec<u8> = (start..end)
                    .map(|i| object.get(i).copied().unwrap_or(0xAA))
                    .collect();
                if op[0] % 5 == 1 && !bytes.is_empty() {
                    let at = usize::from(op[0]) % bytes.len();
                    bytes[at] ^= 0x5A;
                }
                accept_checked(&mut asm, &mut model, start as u64, &bytes);
            }
            2 => {
                let far = u64::MAX - offset;
                let bytes = &object[..len.min(size)];
                assert!(asm.accept(far, bytes).is_err(), "chunk at {far} accepted");
                assert_eq!(asm.held(), model, "refused chunk changed the held bytes");
            }
            3 => {
                let from = model.len() as u64;
                for (at, piece) in chunks(&object, from) {
                    accept_checked(&mut asm, &mut model, at, piece);
                }
            }
            _ => finish_checked(asm.clone(), &model, &object, id),
        }
    }
    finish_checked(asm, &model, &object, id);
}

fn accept_checked(asm: &mut Assembler, model: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let size = asm.target().size;
    let have = model.len() as u64;
    let end = offset + bytes.len() as u64;
    let overlap = have.saturating_sub(offset).min(bytes.len() as u64) as usize;
    let expect_ok = end <= size
        && offset <= have
        && model[offset as usize..offset as usize + overlap] == bytes[..overlap];
    let got = asm.accept(offset, bytes);
    assert_eq!(
        got.is_ok(),
        expect_ok,
        "accept({offset}, {} bytes) with {have} of {size} held: {got:?}",
        bytes.len()
    );
    if expect_ok && end > have {
        model.extend_from_slice(&bytes[overlap..]);
    }
    assert_eq!(asm.held(), &model[..], "held bytes differ from the model");
    assert_eq!(asm.received(), model.len() as u64);
    assert!(asm.received() <= size, "holds more than the object");
    assert_eq!(asm.is_complete(), asm.received() == size);
}

fn finish_checked(asm: Assembler, model: &[u8], object: &[u8], id: ObjectId) {
    let complete = model.len() == object.len();
    let matches = ObjectId::of(model) == id;
    match asm.finish() {
        Ok(bytes) => {
            assert!(complete && matches, "finish accepted a wrong object");
            assert_eq!(bytes, model);
        }
        Err(e) => assert!(!(complete && matches), "finish refused a whole object: {e}"),
    }
}

// ---------------------------------------------------------------------------
// drift_summary

/// The sketch spec the drift target's monitor uses (small, fixed).
pub fn drift_spec() -> SketchSpec {
    let projections = 2u16;
    let bins = 4u16;
    let features = 2 + usize::from(projections);
    let edges = (0..features)
        .flat_map(|f| (1..bins).map(move |i| f as f32 * 0.1 + f32::from(i) * 0.25 - 0.5))
        .collect();
    SketchSpec {
        dim: 16,
        classes: 3,
        projections,
        taps: 4,
        seed: 11,
        bins,
        confidence_bins: 3,
        edges,
    }
}

/// A deterministic input of the drift spec's shape.
fn drift_input(i: usize, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|j| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.3)
        .collect()
}

/// The training summary of the drift target's monitor.
pub fn drift_training() -> Summary {
    let spec = drift_spec();
    let mut b = SummaryBuilder::new(Sketcher::new(spec.clone()).expect("valid spec"));
    for i in 0..64 {
        b.observe_training(&drift_input(i, spec.dim as usize), (i % 3) as u8);
    }
    b.take()
}

/// Largest number of sketch taps the drift target builds for a hostile spec.
const DRIFT_MAX_TAPS: usize = 1 << 16;

/// Mode byte even: the coordinator's side. The rest is a stream of
/// [`AgentMessage`] frames; each `DriftReport` in it is ingested as another
/// device's into a [`DriftMonitor`], then the window is closed. A summary is
/// accepted exactly when its shape, counts, tags and version are right; a
/// closed window's scores are never NaN and never negative. Mode byte odd:
/// the agent's side. The rest is a [`SketchSpec`] as the coordinator sends
/// it (postcard); a spec the agent accepts must summarise inputs into a
/// summary that the coordinator's check accepts.
pub fn drift_summary(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        drift_monitor(mode, rest);
    } else {
        drift_sketch(rest);
    }
}

fn drift_monitor(mode: u8, stream: &[u8]) {
    let spec = drift_spec();
    let cfg = MonitorConfig {
        min_inputs: 1 + u64::from(mode / 2 % 4),
        devices: mode & 0x10 != 0,
        baseline_windows: u32::from(mode >> 5),
        ..MonitorConfig::default()
    };
    let mut monitor = DriftMonitor::new(
        cfg,
        RetrainPolicy {
            enabled: true,
            ..RetrainPolicy::default()
        },
        spec.clone(),
        1,
        drift_training(),
    )
    .expect("the monitor's own settings are valid");
    let mut dec = FrameDecoder::new(MAX_FRAME);
    if dec.push(stream).is_err() {
        return;
    }
    let mut device = 0u64;
    let mut accepted = 0u64;
    while let Ok(Some(msg)) = dec.next_message::<AgentMessage>() {
        let AgentMessage::DriftReport(report) = msg else {
            continue;
        };
        device += 1;
        let valid = report.deployment == 1
            && report.summary.check(&spec).is_ok()
            && report.tags.len() <= fleet_coordinator::drift::MAX_TAGS
            && report
                .tags
                .iter()
                .all(|t| !t.is_empty() && t.len() <= fleet_coordinator::drift::MAX_TAG_LEN);
        let got = monitor.ingest(&DeviceSummary {
            device: device % 3,
            tags: &report.tags,
            version: report.deployment,
            summary: &report.summary,
        });
        if got.is_ok() {
            assert!(valid, "monitor accepted an invalid summary: {report:?}");
            accepted += 1;
        } else if valid {
            // The only other refusal: a device's second summary in a window.
            assert!(
                matches!(
                    got,
                    Err(fleet_coordinator::drift::DriftRejection::Duplicate(_))
                ),
                "valid summary refused: {got:?}"
            );
        }
        if device.is_multiple_of(4) {
            check_window(&mut monitor);
        }
    }
    let _ = accepted;
    check_window(&mut monitor);
}

fn check_window(monitor: &mut DriftMonitor) {
    let report = monitor.close_window();
    for scope in &report.scopes {
        let Some(s) = &scope.scores else { continue };
        let all = [
            Some(s.inputs),
            Some(s.predictions),
            Some(s.covariate_psi),
            Some(s.covariate_js),
            Some(s.covariate_ks),
            s.label_psi,
            s.confidence_psi,
            s.accuracy,
        ];
        for v in all.into_iter().flatten() {
            assert!(
                !v.is_nan() && v >= 0.0,
                "score {v} in {:?}: {s:?}",
                scope.scope
            );
        }
        if let Some(d) = s.accuracy_drop {
            assert!(!d.is_nan(), "accuracy drop NaN in {:?}: {s:?}", scope.scope);
        }
    }
}

fn drift_sketch(bytes: &[u8]) {
    let Ok(spec) = decode::<SketchSpec>(bytes) else {
        return;
    };
    let taps = usize::from(spec.projections) * usize::from(spec.taps);
    if taps > DRIFT_MAX_TAPS || spec.dim as usize > DRIFT_MAX_TAPS {
        // Large but valid; only the allocation would be tested.
        return;
    }
    let Ok(sketcher) = Sketcher::new(spec.clone()) else {
        assert!(spec.check().is_err());
        return;
    };
    let dim = spec.dim as usize;
    let classes = usize::from(spec.classes);
    let mut b = SummaryBuilder::new(sketcher);
    for i in 0..4 {
        let x = drift_input(i, dim);
        let logits: Vec<f32> = (0..classes).map(|c| ((c + i) % 5) as f32).collect();
        b.observe(&x, &logits, Some((i % classes) as u8));
    }
    b.label(0, 0);
    let summary = b.take();
    summary
        .check(&spec)
        .unwrap_or_else(|e| panic!("the agent's own summary is refused: {e}"));
    assert_eq!(summary.inputs(&spec), 4.0);
}

// ---------------------------------------------------------------------------
// enroll_csr

/// The coordinator's limit on a certificate signing request (`MAX_CSR_LEN`).
const CSR_MAX: usize = fleet_coordinator::limits::MAX_CSR_LEN;

fn fuzz_ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| CertificateAuthority::create("fuzz CA").expect("a CA"))
}

/// The enrollment request of a device: DER bytes (up to the coordinator's
/// limit) signed by the CA as device `id`. A certificate issued for any
/// request must name exactly that device as its only role.
pub fn enroll_csr(data: &[u8]) {
    if data.len() > CSR_MAX {
        return;
    }
    let id = data.len() as u64 * 7919;
    if let Ok(cert) = fuzz_ca().issue_device(data, id, 30) {
        let (role, serial) = role_of(&cert).expect("an issued certificate has a role");
        assert_eq!(
            role,
            Role::Device(id),
            "issued certificate names another role"
        );
        assert!(!serial.is_empty());
    }
}

// ---------------------------------------------------------------------------
// idx

/// IDX bytes (gzip or plain). Mode byte even: one file; an accepted array
/// holds exactly the product of its dimensions, no more than the
/// (decompressed) input, and re-encodes to the same bytes. Mode byte odd:
/// the next two bytes split the rest into an image file and a label file,
/// which become a data set as an agent's data directory does; a data set
/// has one label per image and only finite features.
pub fn idx(data: &[u8]) {
    use fleet_models::data::device::encode_idx;
    use fleet_models::data::idx::{maybe_gunzip, parse_idx};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parse = |bytes: &[u8]| {
        let plain = maybe_gunzip("fuzz", bytes).ok()?;
        let a = parse_idx("fuzz", &plain).ok()?;
        let total: usize = a.dims.iter().product();
        assert_eq!(
            a.data.len(),
            total,
            "data length is not the dimensions' product"
        );
        assert!(a.data.len() <= plain.len(), "more data than bytes");
        assert_eq!(encode_idx(&a), plain, "IDX does not re-encode to its bytes");
        Some(a)
    };
    if mode % 2 == 0 {
        parse(rest);
        return;
    }
    if rest.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
    let (images, labels) = rest[2..].split_at(split);
    let (Some(images), Some(labels)) = (parse(images), parse(labels)) else {
        return;
    };
    if let Ok(set) = fleet_models::data::fashion::from_idx(&images, &labels, "fuzz") {
        assert_eq!(set.len(), labels.data.len());
        assert_eq!(set.len(), images.dims[0]);
        assert_eq!(set.features().len(), images.data.len());
        assert!(set.features().iter().all(|v| v.is_finite()));
        assert!(set.labels().iter().all(|&l| usize::from(l) < set.classes()));
    }
}

// ---------------------------------------------------------------------------
// fleet_file

/// A fleet file (UTF-8 TOML). A fleet that validates must serialise back to
/// TOML that parses and validates to the same fleet, and everything the
/// simulator derives from it (model, engine, training, strategy, codec,
/// task) must come out without a panic and be valid where it has a check.
pub fn fleet_file(data: &[u8]) {
    use fleet_sim::fleet::Fleet;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(fleet) = Fleet::from_toml(text) else {
        return;
    };
    let written = toml::to_string(&fleet).expect("a valid fleet serialises");
    let again = Fleet::from_toml(&written)
        .unwrap_or_else(|e| panic!("a valid fleet written back is refused: {e}\n{written}"));
    assert_eq!(
        toml::to_string(&again).expect("serialises"),
        written,
        "fleet changed through TOML"
    );
    let spec = fleet.model_spec();
    let _ = fleet.engine_config();
    let _ = fleet.train_config();
    let _ = fleet.strategy();
    let _ = fleet.dp();
    fleet
        .codec()
        .validate()
        .unwrap_or_else(|e| panic!("a valid fleet's codec is invalid: {e}"));
    spec.validate()
        .unwrap_or_else(|e| panic!("a valid fleet's model is invalid: {e}"));
    let _ = fleet.task_spec();
}

// ---------------------------------------------------------------------------
// onnx_model

/// An ONNX file as the agent receives it for serving. A model that loads
/// must have been checked against its own SHA-256 the same way, predict a
/// batch of two zero examples with two equal rows of `classes` finite
/// logits, and refuse a batch of the wrong width and a non-finite value.
pub fn onnx_model(data: &[u8]) {
    use fleet_edge_agent::inference::Model;
    let Ok(model) = Model::load(data.to_vec(), None) else {
        return;
    };
    let sha = fleet_models::export::sha256_hex(data);
    assert_eq!(model.sha256(), sha);
    assert_eq!(model.artifact_bytes(), data.len());
    let features = model.features();
    let classes = model.classes();
    assert!(features > 0 && classes > 0);
    let p = model
        .predict(&vec![0.0; 2 * features])
        .expect("a loaded model predicts zeros");
    assert_eq!(p.logits.len(), 2 * classes);
    assert_eq!(p.row(0), p.row(1), "equal inputs, different logits");
    assert!(p.logits.iter().all(|v| v.is_finite()));
    assert!(model.predict(&vec![0.0; features + 1]).is_err());
    let mut bad = vec![0.0; features];
    bad[0] = f32::NAN;
    assert!(model.predict(&bad).is_err());
    assert!(Model::load(data.to_vec(), Some(&sha)).is_ok());
}

// ---------------------------------------------------------------------------
// seeds

/// Valid inputs of every target, named, for the initial corpora: real
/// messages of every type, real updates of every codec, real drift reports,
/// CSRs, IDX files, the simulator's fleet files and exported ONNX models.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "frame" => seeds::frame(),
        "update_codec" => seeds::update_codec(),
        "chunk_assembler" => seeds::chunk_assembler(),
        "drift_summary" => seeds::drift_summary(),
        "enroll_csr" => seeds::enroll_csr(),
        "idx" => seeds::idx(),
        "fleet_file" => seeds::fleet_file(),
        "onnx_model" => seeds::onnx_model(),
        other => panic!("no target {other}"),
    }
}

mod seeds {
    use super::*;
    use fleet_models::data::idx::IdxArray;
    use fleet_models::export::{self, ExportInfo, QuantConfig};
    use fleet_models::{Dataset, ModelSpec, TrainConfig};
    use fleet_protocol::ErrorCode;
    use fleet_protocol::WireError;
    use fleet_protocol::admin::{
        ArtifactInfo, DeviceInfo, ModelInfo, RoundInfo, TaskCommand, TaskInfo, TaskState,
    };
    use fleet_protocol::message::{
        Capabilities, DeployedArtifact, Deployment, DriftReport, DriftSpecInfo, Plan, UpdateMeta,
    };
    use fleet_sim::fleet::Fleet;
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf()
    }

    fn fleets() -> Vec<(String, String)> {
        let dir = root().join("sim/fleets");
        let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
            .expect("sim/fleets")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| {
                let name = p.file_stem().expect("name").to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).expect("fleet file"))
            })
            .collect();
        out.sort();
        out
    }

    fn task_spec() -> TaskSpec {
        let text =
            std::fs::read_to_string(root().join("sim/fleets/dp-fashion.toml")).expect("fleet file");
        Fleet::from_toml(&text).expect("valid fleet").task_spec()
    }

    fn obj(bytes: &[u8]) -> ObjectRef {
        ObjectRef {
            id: ObjectId::of(bytes),
            size: bytes.len() as u64,
        }
    }

    fn report() -> DriftReport {
        let spec = drift_spec();
        let mut b = SummaryBuilder::new(Sketcher::new(spec.clone()).expect("spec"));
        for i in 0..8 {
            let x = drift_input(i + 100, spec.dim as usize);
            b.observe(&x, &[1.0, 0.5, (i % 3) as f32], Some((i % 3) as u8));
        }
        DriftReport {
            deployment: 1,
            tags: vec!["region:eu".into(), "class:phone".into()],
            summary: b.take(),
        }
    }

    fn tagged(kind: u8, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![kind, 17];
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    pub(super) fn frame() -> Vec<(String, Vec<u8>)> {
        let spec = task_spec();
        let model = ModelSpec::fashion_logreg();
        let o = obj(b"model");
        let meta = UpdateMeta {
            task: 1,
            round: 3,
            fingerprint: model.layout().fingerprint(),
            object: o,
            examples: Some(120),
            train_loss: Some(0.5),
        };
        let (_, csr) = fleet_protocol::tls::device_key_and_csr().expect("csr");
        let agent = [
            AgentMessage::Hello {
                version: fleet_protocol::PROTOCOL_VERSION,
                min_version: fleet_protocol::MIN_SUPPORTED_VERSION,
                software: "0.1.0".into(),
            },
            AgentMessage::CheckIn {
                capabilities: Capabilities {
                    memory_mib: 512,
                    eligible: true,
                },
            },
            AgentMessage::Fetch {
                object: o.id,
                offset: 4096,
            },
            AgentMessage::BeginUpload(meta),
            AgentMessage::Enroll {
                token: "tok-123".into(),
                csr,
            },
            AgentMessage::GetDeployment,
            AgentMessage::UploadChunk {
                object: o.id,
                offset: 0,
                data: vec![1, 2, 3, 4, 5, 6, 7, 8],
            },
            AgentMessage::GetDriftSpec,
            AgentMessage::DriftReport(report()),
        ];
        let deployment = Deployment {
            version: 2,
            model: o,
            spec: model.clone(),
            artifact: DeployedArtifact {
                object: obj(b"onnx"),
                variant: Default::default(),
                model_version: 5,
            },
        };
        let coordinator = [
            CoordinatorMessage::HelloAck { version: 1 },
            CoordinatorMessage::Plan(Plan {
                task: 1,
                round: 3,
                model: o,
                spec: model.clone(),
                train: TrainConfig::default(),
                dp: spec.dp,
                codec: Codec::TopK {
                    fraction: 0.1,
                    values: ValueCodec::Int8,
                },
                report_within_ms: 60_000,
                secure: None,
            }),
            CoordinatorMessage::ComeBackLater { after_ms: 500 },
            CoordinatorMessage::Chunk {
                object: o.id,
                offset: 0,
                total: 5,
                data: b"model".to_vec(),
            },
            CoordinatorMessage::UploadProgress {
                object: o.id,
                received: 3,
            },
            CoordinatorMessage::UploadAccepted { object: o.id },
            CoordinatorMessage::Enrolled {
                device: 9,
                certificate: vec![0x30, 0x03, 0x02, 0x01, 0x01],
            },
            CoordinatorMessage::Deployment(Some(deployment)),
            CoordinatorMessage::Error(WireError {
                code: ErrorCode::Malformed,
                message: "bad".into(),
            }),
            CoordinatorMessage::DriftSpec(Some(DriftSpecInfo {
                deployment: 2,
                spec: drift_spec(),
                window_secs: 3600,
            })),
            CoordinatorMessage::DriftAccepted { window: 4 },
        ];
        let requests = [
            AdminRequest::Hello {
                version: 1,
                min_version: 1,
            },
            AdminRequest::CreateToken {
                label: "dev".into(),
                ttl_secs: 600,
            },
            AdminRequest::ListDevices,
            AdminRequest::RevokeDevice { device: 3 },
            AdminRequest::CreateTask(Box::new(spec.clone())),
            AdminRequest::SetTaskState {
                task: 1,
                command: TaskCommand::Start,
            },
            AdminRequest::ListTasks,
            AdminRequest::ListRounds { task: 1 },
            AdminRequest::ListModels { task: Some(1) },
            AdminRequest::Deploy {
                model: "abcd".into(),
            },
            AdminRequest::Rollback,
            AdminRequest::Budget { task: 1 },
            AdminRequest::Drift,
        ];
        let responses = [
            AdminResponse::HelloAck { version: 1 },
            AdminResponse::Token {
                token: "t".into(),
                expires_at: 99,
            },
            AdminResponse::Devices(vec![DeviceInfo {
                id: 1,
                label: "a".into(),
                enrolled_at: 5,
                revoked_at: None,
                last_seen: Some(7),
                connected: true,
            }]),
            AdminResponse::Tasks(vec![TaskInfo {
                id: 1,
                spec: spec.clone(),
                state: TaskState::Running,
                rounds_closed: 2,
                model: "abcd".into(),
                note: None,
            }]),
            AdminResponse::Rounds(vec![RoundInfo {
                task: 1,
                round: 2,
                outcome: "closed".into(),
                ended_at: Some(3),
                participants: vec![1, 2, 3],
                model: Some("ab".into()),
                epsilon: Some(0.5),
            }]),
            AdminResponse::Models(vec![ModelInfo {
                id: "ab".into(),
                task: 1,
                round: 2,
                size: 100,
                created_at: 4,
                deployed: false,
                artifacts: vec![ArtifactInfo {
                    variant: "int8".into(),
                    id: Some("cd".into()),
                    size: Some(10),
                    error: None,
                }],
            }]),
            AdminResponse::Done {
                message: "ok".into(),
                id: Some(4),
            },
            AdminResponse::Error(WireError {
                code: ErrorCode::TooLarge,
                message: "big".into(),
            }),
            AdminResponse::Drift(None),
        ];
        let mut out = Vec::new();
        let mut add = |name: String, kind: u8, frames: Vec<Vec<u8>>| {
            out.push((name, tagged(kind, &frames)));
        };
        for (i, m) in agent.iter().enumerate() {
            add(format!("agent-{i}"), 0, vec![encode(m)]);
        }
        add("agent-all".into(), 0, agent.iter().map(encode).collect());
        for (i, m) in coordinator.iter().enumerate() {
            add(format!("coordinator-{i}"), 1, vec![encode(m)]);
        }
        for (i, m) in requests.iter().enumerate() {
            add(format!("admin-request-{i}"), 2, vec![encode(m)]);
        }
        add(
            "admin-requests-all".into(),
            2,
            requests.iter().map(encode).collect(),
        );
        for (i, m) in responses.iter().enumerate() {
            add(format!("admin-response-{i}"), 3, vec![encode(m)]);
        }
        add("task-spec".into(), 4, vec![encode(&spec)]);
        out
    }

    pub(super) fn update_codec() -> Vec<(String, Vec<u8>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let codecs = [
            ("f32", Codec::F32),
            ("f16", Codec::F16),
            ("int8", Codec::INT8),
            ("int8-chunk7", Codec::Int8 { chunk: 7 }),
            (
                "topk-f16",
                Codec::TopK {
                    fraction: 0.1,
                    values: ValueCodec::F16,
                },
            ),
            (
                "topk-f32",
                Codec::TopK {
                    fraction: 0.05,
                    values: ValueCodec::F32,
                },
            ),
            (
                "topk-int8",
                Codec::TopK {
                    fraction: 0.2,
                    values: ValueCodec::Int8,
                },
            ),
        ];
        let mut out = Vec::new();
        for (name, c) in codecs {
            out.push((name.to_string(), c.encode(&x, &mut rng).expect("encodes")));
            out.push((
                format!("{name}-short"),
                c.encode(&x[..9], &mut rng).expect("encodes"),
            ));
        }
        out
    }

    pub(super) fn chunk_assembler() -> Vec<(String, Vec<u8>)> {
        let mut whole = vec![0x10, 0x02, 0x00, 0x10, 9, 0, 0];
        whole.extend_from_slice(&[3, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
        let mut pieces = vec![0x00, 0x03, 0x00, 0x04, 3, 2, 2];
        for (off, len) in [
            (0u16, 100u16),
            (50, 100),
            (150, 200),
            (350, 418),
            (700, 200),
        ] {
            pieces.push(0);
            pieces.extend_from_slice(&off.to_le_bytes());
            pieces.extend_from_slice(&len.to_le_bytes());
        }
        pieces.extend_from_slice(&[1, 0x20, 0, 10, 0, 2, 5, 0, 1, 0, 4, 0, 0, 0, 0]);
        vec![("whole".into(), whole), ("pieces".into(), pieces)]
    }

    pub(super) fn drift_summary() -> Vec<(String, Vec<u8>)> {
        let r = report();
        let mut other = report();
        other.tags = vec!["group:b".into()];
        let mut stream = vec![0x12];
        for m in [
            AgentMessage::DriftReport(r.clone()),
            AgentMessage::DriftReport(other),
            AgentMessage::DriftReport(r.clone()),
            AgentMessage::GetDriftSpec,
            AgentMessage::DriftReport(r.clone()),
        ] {
            stream.extend_from_slice(&encode(&m));
        }
        let mut one = vec![0x20];
        one.extend_from_slice(&encode(&AgentMessage::DriftReport(r)));
        let mut spec = vec![1];
        spec.extend_from_slice(&encode(&drift_spec())[4..]);
        let fitted = SketchSpec::fit(
            12,
            4,
            (0..40)
                .map(|i| drift_input(i, 12))
                .collect::<Vec<_>>()
                .iter()
                .map(|v| &v[..]),
            fleet_drift::FitConfig {
                projections: 3,
                taps: 5,
                bins: 5,
                confidence_bins: 4,
                seed: 3,
            },
        )
        .expect("fit");
        let mut fitted_bytes = vec![3];
        fitted_bytes.extend_from_slice(&encode(&fitted)[4..]);
        vec![
            ("reports".into(), stream),
            ("report".into(), one),
            ("spec".into(), spec),
            ("spec-fitted".into(), fitted_bytes),
        ]
    }

    pub(super) fn enroll_csr() -> Vec<(String, Vec<u8>)> {
        (0..2)
            .map(|i| {
                let (_, csr) = fleet_protocol::tls::device_key_and_csr().expect("csr");
                (format!("csr-{i}"), csr)
            })
            .collect()
    }

    pub(super) fn idx() -> Vec<(String, Vec<u8>)> {
        use fleet_models::data::device::encode_idx;
        use std::io::Write;
        let images = IdxArray {
            dims: vec![3, 4, 5],
            data: (0..60).map(|i| (i * 13) as u8).collect(),
        };
        let labels = IdxArray {
            dims: vec![3],
            data: vec![0, 9, 4],
        };
        let (im, lb) = (encode_idx(&images), encode_idx(&labels));
        let gz = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(b).expect("gzip");
            e.finish().expect("gzip")
        };
        let pair = |a: &[u8], b: &[u8]| {
            let mut out = vec![1];
            out.extend_from_slice(&(a.len() as u16).to_le_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b);
            out
        };
        let one = |a: &[u8]| [&[0u8][..], a].concat();
        vec![
            ("images".into(), one(&im)),
            ("labels".into(), one(&lb)),
            ("images-gz".into(), one(&gz(&im))),
            ("pair".into(), pair(&im, &lb)),
            ("pair-gz".into(), pair(&gz(&im), &gz(&lb))),
        ]
    }

    pub(super) fn fleet_file() -> Vec<(String, Vec<u8>)> {
        fleets()
            .into_iter()
            .map(|(n, t)| (n, t.into_bytes()))
            .collect()
    }

    pub(super) fn onnx_model() -> Vec<(String, Vec<u8>)> {
        let specs = [
            (
                "logreg",
                ModelSpec::LogReg {
                    inputs: 6,
                    classes: 3,
                },
            ),
            (
                "mlp",
                ModelSpec::Mlp {
                    inputs: 5,
                    hidden: vec![4],
                    classes: 2,
                },
            ),
        ];
        let info = ExportInfo {
            version: 3,
            labels: Vec::new(),
            normalization: None,
        };
        let mut out = Vec::new();
        for (name, spec) in specs {
            let params = spec.init_params(1);
            let float = export::export_float(&spec, &params, &info).expect("export");
            out.push((format!("{name}-float"), float.onnx));
            let n = 8;
            let features: Vec<f32> = (0..n * spec.inputs())
                .map(|i| (i % 7) as f32 / 7.0)
                .collect();
            let labels: Vec<u8> = (0..n).map(|i| (i % spec.classes()) as u8).collect();
            let set = Dataset::new(
                features,
                labels,
                vec![spec.inputs()],
                spec.classes(),
                (0..spec.classes()).map(|c| format!("c{c}")).collect(),
            )
            .expect("data set");
            let int8 = export::quantize(&spec, &params, &info, set.view(), &QuantConfig::default())
                .expect("quantize");
            out.push((format!("{name}-int8"), int8.onnx));
        }
        out
    }
}
