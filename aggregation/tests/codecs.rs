//! Update codecs: exactness, error bounds, unbiasedness, error feedback and
//! hostile input.

use fleet_aggregation::codec::{Codec, ErrorFeedback, ValueCodec, decode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn update(d: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..d)
        .map(|_| {
            rng.random_range(-0.05f32..0.05)
                * if rng.random::<f32>() < 0.01 {
                    20.0
                } else {
                    1.0
                }
        })
        .collect()
}

#[test]
fn f32_is_exact_and_f16_is_within_half_precision() {
    let x = update(10_000, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let b = Codec::F32.encode(&x, &mut rng).unwrap();
    assert_eq!(b.len(), 5 + 4 * x.len());
    assert_eq!(decode(&b, x.len()).unwrap(), x);
    let b = Codec::F16.encode(&x, &mut rng).unwrap();
    assert_eq!(b.len(), 5 + 2 * x.len());
    let y = decode(&b, x.len()).unwrap();
    for (a, b) in x.iter().zip(&y) {
        // Half precision keeps 11 significant bits; below 2^-14 it is subnormal (step 2^-24).
        assert!(
            (a - b).abs() <= a.abs() * 2f32.powi(-11) + 2f32.powi(-24),
            "{a} vs {b}"
        );
    }
}

#[test]
fn int8_is_unbiased_and_bounded() {
    let x = update(4096, 2);
    let codec = Codec::Int8 { chunk: 256 };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let reps = 400;
    let mut mean = vec![0.0f64; x.len()];
    for _ in 0..reps {
        let b = codec.encode(&x, &mut rng).unwrap();
        assert_eq!(b.len(), 5 + 4 + x.len() + 4 * 16);
        let y = decode(&b, x.len()).unwrap();
        for (c, chunk) in x.chunks(256).enumerate() {
            let step = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (k, v) in chunk.iter().enumerate() {
                assert!(
                    (y[c * 256 + k] - v).abs() <= step * 1.0001,
                    "one quantisation step at most"
                );
            }
        }
        for (m, v) in mean.iter_mut().zip(&y) {
            *m += f64::from(*v) / f64::from(reps);
        }
    }
    // The average of many encodings converges to the input (unbiased rounding):
    // its error shrinks like step/√reps, far below one step.
    let err: f64 = x
        .iter()
        .zip(&mean)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .sum::<f64>()
        / x.len() as f64;
    let step: f64 = x.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max) / 127.0;
    assert!(err < step / 10.0, "mean error {err}, step {step}");
}

#[test]
fn top_k_keeps_the_largest_and_error_feedback_loses_nothing() {
    let codec = Codec::TopK {
        fraction: 0.1,
        values: ValueCodec::F32,
    };
    let x = update(1000, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let b = codec.encode(&x, &mut rng).unwrap();
    assert_eq!(b.len(), 5 + 5 + 100 * 8);
    let y = decode(&b, x.len()).unwrap();
    let kept: Vec<f32> = y.iter().copied().filter(|v| *v != 0.0).collect();
    assert_eq!(kept.len(), 100);
    let threshold = kept.iter().fold(f32::INFINITY, |m, v| m.min(v.abs()));
    assert!(
        x.iter()
            .zip(&y)
            .all(|(a, b)| *b != 0.0 || a.abs() <= threshold)
    );

    // Error feedback: what was sent over the rounds plus the residual equals
    // what was meant to be sent.
    let mut ef = ErrorFeedback::default();
    let mut sent = vec![0.0f64; 1000];
    let mut meant = vec![0.0f64; 1000];
    for round in 0..20 {
        let u = update(1000, 100 + round);
        let b = ef.encode(&codec, &u, &mut rng).unwrap();
        for (s, v) in sent.iter_mut().zip(decode(&b, 1000).unwrap()) {
            *s += f64::from(v);
        }
        for (m, v) in meant.iter_mut().zip(&u) {
            *m += f64::from(*v);
        }
    }
    for i in 0..1000 {
        assert!((sent[i] + f64::from(ef.residual()[i]) - meant[i]).abs() < 1e-4);
    }
    // With int8 values too.
    let q = Codec::TopK {
        fraction: 0.05,
        values: ValueCodec::Int8,
    };
    let b = q.encode(&x, &mut rng).unwrap();
    assert!(
        decode(&b, 1000)
            .unwrap()
            .iter()
            .filter(|v| **v != 0.0)
            .count()
            <= 50
    );
}

#[test]
fn hostile_bytes_are_errors() {
    let x = update(300, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for codec in [
        Codec::F32,
        Codec::F16,
        Codec::INT8,
        Codec::TopK {
            fraction: 0.2,
            values: ValueCodec::F16,
        },
    ] {
        let b = codec.encode(&x, &mut rng).unwrap();
        assert!(decode(&b, 300).is_ok());
        for cut in [0, 1, 4, 5, b.len() / 2, b.len() - 1] {
            assert!(decode(&b[..cut], 300).is_err(), "{codec:?} cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(
            decode(&long, 300)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
        assert!(decode(&b, 301).unwrap_err().to_string().contains("301"));
    }
    let mut bad_tag = Codec::F32.encode(&x, &mut rng).unwrap();
    bad_tag[0] = 99;
    assert!(
        decode(&bad_tag, 300)
            .unwrap_err()
            .to_string()
            .contains("unknown codec")
    );
    // A NaN scale in an int8 chunk.
    let mut nan_scale = Codec::INT8.encode(&x, &mut rng).unwrap();
    nan_scale[9..13].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(
        decode(&nan_scale, 300)
            .unwrap_err()
            .to_string()
            .contains("scale")
    );
    // Top-k indices out of order, or out of range.
    let topk = Codec::TopK {
        fraction: 0.1,
        values: ValueCodec::F32,
    }
    .encode(&x, &mut rng)
    .unwrap();
    let mut swapped = topk.clone();
    let (a, b) = (10, 14);
    for i in 0..4 {
        swapped.swap(a + i, b + i);
    }
    assert!(
        decode(&swapped, 300)
            .unwrap_err()
            .to_string()
            .contains("ascending")
    );
    let mut oob = topk.clone();
    let last = 10 + 4 * 29;
    oob[last..last + 4].copy_from_slice(&5000u32.to_le_bytes());
    assert!(
        decode(&oob, 300)
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
    // A huge declared length never allocates: it is refused against the model length.
    let mut huge = vec![1u8];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&huge, 300).is_err());
    assert!(
        Codec::TopK {
            fraction: 0.0,
            values: ValueCodec::F32
        }
        .encode(&x, &mut rng)
        .is_err()
    );
    assert!(Codec::Int8 { chunk: 0 }.encode(&x, &mut rng).is_err());
}

/// `decode_into` gives `decode`'s values for every codec, into a buffer
/// that held another update, and its errors for hostile bytes, leaving the
/// buffer empty.
#[test]
fn decode_into_is_decode_reusing_the_buffer() {
    use fleet_aggregation::codec::decode_into;
    let x = update(300, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut out = vec![7.0f32; 1000];
    for codec in [
        Codec::F32,
        Codec::F16,
        Codec::INT8,
        Codec::TopK {
            fraction: 0.2,
            values: ValueCodec::F32,
        },
    ] {
        let b = codec.encode(&x, &mut rng).unwrap();
        decode_into(&b, 300, &mut out).unwrap();
        assert_eq!(out, decode(&b, 300).unwrap(), "{codec:?}");
        for cut in [0, 1, 4, 5, b.len() / 2, b.len() - 1] {
            let want = decode(&b[..cut], 300).unwrap_err().to_string();
            let got = decode_into(&b[..cut], 300, &mut out)
                .unwrap_err()
                .to_string();
            assert_eq!(got, want, "{codec:?} cut at {cut}");
            assert!(out.is_empty());
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_into(&long, 300, &mut out).is_err());
        assert!(
            decode_into(&b, 301, &mut out)
                .unwrap_err()
                .to_string()
                .contains("301")
        );
        assert!(out.is_empty());
    }
}
