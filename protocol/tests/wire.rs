//! Frames, messages and transfers: round trips, limits, and hostile bytes.

use fleet_aggregation::codec::Codec;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::error::{Error, ErrorCode, WireError};
use fleet_protocol::frame::{FrameDecoder, MAX_FRAME, decode, encode};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, ObjectRef, Plan, UpdateMeta,
};
use fleet_protocol::transfer::{Assembler, CHUNK_SIZE, chunks};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn agent_messages() -> Vec<AgentMessage> {
    let obj = ObjectRef {
        id: ObjectId::of(b"update"),
        size: 6,
    };
    vec![
        AgentMessage::Hello {
            version: 1,
            min_version: 1,
            software: "fleet-agent 0.1.0".into(),
        },
        AgentMessage::CheckIn {
            capabilities: Capabilities {
                memory_mib: 512,
                eligible: true,
            },
        },
        AgentMessage::Fetch {
            object: obj.id,
            offset: 1 << 20,
        },
        AgentMessage::BeginUpload(UpdateMeta {
            task: 7,
            round: 3,
            fingerprint: ModelSpec::fashion_2nn().layout().fingerprint(),
            object: obj,
            examples: Some(600),
            train_loss: Some(0.42),
        }),
        AgentMessage::UploadChunk {
            object: obj.id,
            offset: 0,
            data: b"update".to_vec(),
        },
    ]
}

fn coordinator_messages() -> Vec<CoordinatorMessage> {
    let obj = ObjectRef {
        id: ObjectId::of(b"model"),
        size: 5,
    };
    vec![
        CoordinatorMessage::HelloAck { version: 1 },
        CoordinatorMessage::Plan(Plan {
            task: 7,
            round: 3,
            model: obj,
            spec: ModelSpec::fashion_cnn(),
            train: TrainConfig::default(),
            dp: None,
            codec: Codec::INT8,
            report_within_ms: 60_000,
            secure: None,
        }),
        CoordinatorMessage::ComeBackLater { after_ms: 90_000 },
        CoordinatorMessage::Chunk {
            object: obj.id,
            offset: 0,
            total: 5,
            data: b"model".to_vec(),
        },
        CoordinatorMessage::UploadProgress {
            object: obj.id,
            received: 4,
        },
        CoordinatorMessage::UploadAccepted { object: obj.id },
        CoordinatorMessage::Error(WireError {
            code: ErrorCode::Revoked,
            message: "certificate revoked".into(),
        }),
    ]
}

#[test]
fn messages_round_trip_through_frames_split_anywhere() {
    let msgs = agent_messages();
    let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..50 {
        let mut dec = FrameDecoder::new(MAX_FRAME);
        let mut out = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = rng.random_range(1..=17).min(stream.len() - at);
            dec.push(&stream[at..at + n]).unwrap();
            at += n;
            while let Some(m) = dec.next_message::<AgentMessage>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(dec.pending(), 0);
    }
    for m in coordinator_messages() {
        let f = encode(&m);
        assert_eq!(decode::<CoordinatorMessage>(&f[4..]).unwrap(), m);
    }
}

#[test]
fn oversized_frames_are_refused_from_the_header() {
    let mut dec = FrameDecoder::new(1024);
    let e = dec.push(&(4096u32).to_le_bytes()).unwrap_err();
    assert_eq!(
        e,
        Error::FrameTooLarge {
            size: 4096,
            max: 1024
        }
    );
    assert_eq!(e.code(), ErrorCode::TooLarge);
    let mut dec = FrameDecoder::new(MAX_FRAME);
    assert!(dec.push(&u32::MAX.to_le_bytes()).is_err());
}

#[test]
fn trailing_bytes_and_truncation_are_malformed() {
    let f = encode(&AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib: 1,
            eligible: false,
        },
    });
    let mut long = f[4..].to_vec();
    long.push(0);
    assert!(matches!(
        decode::<AgentMessage>(&long),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        decode::<AgentMessage>(&f[4..f.len() - 1]),
        Err(Error::Malformed(_))
    ));
    assert!(decode::<AgentMessage>(&[]).is_err());
}

#[test]
fn decoding_never_panics_on_any_bytes() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Random byte strings.
    for _ in 0..100_000 {
        let n = rng.random_range(0..64);
        let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let _ = decode::<AgentMessage>(&bytes);
        let _ = decode::<CoordinatorMessage>(&bytes);
    }
    // Valid messages with random bytes flipped, inserted or cut.
    let valid: Vec<Vec<u8>> = agent_messages()
        .iter()
        .map(encode)
        .chain(coordinator_messages().iter().map(encode))
        .collect();
    for _ in 0..100_000 {
        let mut b = valid[rng.random_range(0..valid.len())].clone();
        match rng.random_range(0..3) {
            0 => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let i = rng.random_range(0..=b.len());
                b.insert(i, rng.random());
            }
            _ => b.truncate(rng.random_range(0..b.len())),
        }
        let mut dec = FrameDecoder::new(MAX_FRAME);
        if dec.push(&b).is_ok() {
            let _ = dec.next_message::<AgentMessage>();
        }
        if b.len() > 4 {
            let _ = decode::<CoordinatorMessage>(&b[4..]);
        }
    }
}

#[test]
fn transfers_assemble_resume_and_verify() {
    let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 1000))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let target = ObjectRef {
        id: ObjectId::of(&data),
        size: data.len() as u64,
    };
    let mut a = Assembler::new(target, 1 << 30).unwrap();
    let all: Vec<(u64, &[u8])> = chunks(&data, 0).collect();
    assert_eq!(all.len(), 3);
    a.accept(all[0].0, all[0].1).unwrap();
    // Interrupted: a new assembler resumes from what was held.
    let held = a.held().to_vec();
    let mut b = Assembler::resume(target, 1 << 30, held).unwrap();
    assert_eq!(b.received(), CHUNK_SIZE as u64);
    for (off, c) in chunks(&data, b.received()) {
        b.accept(off, c).unwrap();
    }
    // A resent chunk that matches is harmless.
    b.accept(all[1].0, all[1].1).unwrap();
    assert!(b.is_complete());
    assert_eq!(b.finish().unwrap(), data);
}

#[test]
fn bad_chunks_and_hashes_are_errors() {
    let data = vec![7u8; 100];
    let target = ObjectRef {
        id: ObjectId::of(&data),
        size: 100,
    };
    let mut a = Assembler::new(target, 1000).unwrap();
    assert!(
        a.accept(10, &data[10..20])
            .unwrap_err()
            .to_string()
            .contains("gap")
    );
    assert!(
        a.accept(0, &[7u8; 101])
            .unwrap_err()
            .to_string()
            .contains("past the object size")
    );
    assert!(a.accept(u64::MAX - 1, &[1, 2, 3]).is_err());
    a.accept(0, &data[..50]).unwrap();
    let mut wrong = data[40..60].to_vec();
    wrong[0] = 8;
    assert!(
        a.accept(40, &wrong)
            .unwrap_err()
            .to_string()
            .contains("differ")
    );
    assert!(
        a.clone()
            .finish()
            .unwrap_err()
            .to_string()
            .contains("incomplete")
    );
    let mut tampered = data.clone();
    tampered[99] = 0;
    a.accept(50, &tampered[50..]).unwrap();
    let e = a.finish().unwrap_err();
    assert_eq!(e.code(), ErrorCode::HashMismatch);
    assert!(
        Assembler::new(
            ObjectRef {
                size: 5000,
                ..target
            },
            1000
        )
        .is_err()
    );
}
