//! SecAgg+ rounds with devices and a server in one process: drop-outs at
//! every stage, the threshold, a server that misbehaves, hostile devices.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fleet_secagg::message::{Advertisement, EncryptedShare};
use fleet_secagg::pki::{SimPki, SimSigner};
use fleet_secagg::quantise::Quantiser;
use fleet_secagg::{
    Context, Device, DeviceError, DeviceId, DeviceMessage, Output, Params, Server, ServerMessage,
    Stage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const FLEET: u64 = 99;

fn context(threshold: u16, degree: u16, min_survivors: u32, length: u32) -> Context {
    Context {
        task: 1,
        round: 3,
        attempt: 0,
        params: Params {
            threshold,
            degree,
            min_survivors,
            length,
        },
    }
}

/// Where a device stops answering.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DropAt {
    Advertise,
    Share,
    Masked,
    Unmask,
}

/// What a test may do to the server's messages before they are delivered.
type Tamper = dyn FnMut(DeviceId, &mut ServerMessage);

struct Harness {
    server: Server,
    devices: BTreeMap<DeviceId, Device>,
    inputs: BTreeMap<DeviceId, Vec<u32>>,
    drops: BTreeMap<DeviceId, DropAt>,
    rng: ChaCha20Rng,
    pki: SimPki,
    /// Errors devices answered with.
    refused: Vec<(DeviceId, DeviceError)>,
    now: u64,
}

impl Harness {
    fn new(ctx: Context, n: u64, drops: &[(DeviceId, DropAt)]) -> (Self, VecDeque<Output>) {
        let mut rng = ChaCha20Rng::seed_from_u64(n * 31 + u64::from(ctx.params.threshold));
        let mut server = Server::new(ctx, 0..n, 0, 1_000, 7).unwrap();
        let drops: BTreeMap<_, _> = drops.iter().copied().collect();
        let mut devices = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        let mut queue = VecDeque::new();
        for d in 0..n {
            let input: Vec<u32> = (0..ctx.params.length).map(|_| rng.random()).collect();
            inputs.insert(d, input);
            let signer = SimSigner::new(FLEET, d);
            let (device, ad) = Device::new(d, ctx, &signer, &mut rng).unwrap();
            devices.insert(d, device);
            if drops.get(&d) == Some(&DropAt::Advertise) {
                queue.extend(server.drop_out(d, 0));
            } else {
                queue.extend(server.receive(d, ad, 0));
            }
        }
        (
            Self {
                server,
                devices,
                inputs,
                drops,
                rng,
                pki: SimPki::new(FLEET),
                refused: Vec::new(),
                now: 0,
            },
            queue,
        )
    }

    /// Delivers messages until the round ends; returns its end.
    fn run(&mut self, mut queue: VecDeque<Output>, tamper: &mut Tamper) -> Output {
        loop {
            let Some(out) = queue.pop_front() else {
                // Everyone left is silent: let the deadline pass.
                self.now += 1_000;
                let more = self.server.tick(self.now);
                assert!(
                    !more.is_empty(),
                    "the round stalled in {:?}",
                    self.server.stage()
                );
                queue.extend(more);
                continue;
            };
            match out {
                Output::Send(d, mut msg) => {
                    tamper(d, &mut msg);
                    let stage = match msg {
                        ServerMessage::Neighbours(_) => DropAt::Share,
                        ServerMessage::Shares(_) => DropAt::Masked,
                        ServerMessage::Unmask { .. } => DropAt::Unmask,
                    };
                    if self.drops.get(&d) == Some(&stage) {
                        queue.extend(self.server.drop_out(d, self.now));
                        continue;
                    }
                    let device = self.devices.get_mut(&d).unwrap();
                    let answer = match msg {
                        ServerMessage::Neighbours(ads) => {
                            device.share(&ads, &self.pki, &mut self.rng)
                        }
                        ServerMessage::Shares(s) => device.mask(&s, self.inputs[&d].clone()),
                        ServerMessage::Unmask { survivors, dropped } => {
                            device.reveal(&survivors, &dropped)
                        }
                    };
                    match answer {
                        Ok(m) => queue.extend(self.server.receive(d, m, self.now)),
                        Err(e) => {
                            self.refused.push((d, e));
                            queue.extend(self.server.drop_out(d, self.now));
                        }
                    }
                }
                Output::Refused(r) => panic!("an honest device was refused: {r}"),
                end @ (Output::Finished { .. } | Output::Abandoned { .. }) => return end,
            }
        }
    }

    fn expected_sum(&self, survivors: &[DeviceId]) -> Vec<u32> {
        let len = self.inputs[&0].len();
        let mut sum = vec![0u32; len];
        for d in survivors {
            for (s, v) in sum.iter_mut().zip(&self.inputs[d]) {
                *s = s.wrapping_add(*v);
            }
        }
        sum
    }
}

fn no_tamper() -> Box<Tamper> {
    Box::new(|_, _| {})
}

fn finish(
    n: u64,
    ctx: Context,
    drops: &[(DeviceId, DropAt)],
) -> (Vec<u32>, Vec<DeviceId>, Harness) {
    let (mut h, q) = Harness::new(ctx, n, drops);
    match h.run(q, &mut *no_tamper()) {
        Output::Finished { sum, survivors } => (sum, survivors, h),
        other => panic!("the round did not finish: {other:?}"),
    }
}

#[test]
fn without_drop_outs_the_server_gets_the_exact_sum() {
    let (sum, survivors, h) = finish(20, context(4, 6, 10, 257), &[]);
    assert_eq!(survivors, (0..20).collect::<Vec<_>>());
    assert_eq!(sum, h.expected_sum(&survivors));
    assert!(h.refused.is_empty());
}

#[test]
fn a_drop_out_at_each_stage_leaves_the_sum_exact() {
    for stage in [
        DropAt::Advertise,
        DropAt::Share,
        DropAt::Masked,
        DropAt::Unmask,
    ] {
        let drops = [(3, stage), (11, stage), (12, stage)];
        let (sum, survivors, h) = finish(24, context(3, 6, 10, 100), &drops);
        let expect: Vec<DeviceId> = match stage {
            // A device that sent its masked input counts even if it leaves
            // before unmasking: its neighbours reveal its self mask.
            DropAt::Unmask => (0..24).collect(),
            _ => (0..24).filter(|d| ![3, 11, 12].contains(d)).collect(),
        };
        assert_eq!(survivors, expect, "{stage:?}");
        assert_eq!(sum, h.expected_sum(&survivors), "{stage:?}");
    }
}

#[test]
fn drop_outs_at_every_stage_together_leave_the_sum_exact() {
    let drops = [
        (0, DropAt::Advertise),
        (5, DropAt::Share),
        (9, DropAt::Masked),
        (10, DropAt::Masked),
        (17, DropAt::Unmask),
        (30, DropAt::Unmask),
    ];
    let (sum, survivors, h) = finish(40, context(4, 8, 20, 64), &drops);
    assert_eq!(survivors.len(), 40 - 4);
    assert!(!survivors.contains(&9) && survivors.contains(&17));
    assert_eq!(sum, h.expected_sum(&survivors));
}

#[test]
fn below_the_minimum_the_round_is_abandoned_with_a_reason() {
    let drops: Vec<_> = (0..6).map(|d| (d, DropAt::Masked)).collect();
    let (mut h, q) = Harness::new(context(3, 6, 15, 16), 20, &drops);
    match h.run(q, &mut *no_tamper()) {
        Output::Abandoned { stage, reason } => {
            assert_eq!(stage, Stage::MaskedInput);
            assert!(reason.contains("14 devices sent masked input"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn too_many_drop_outs_among_neighbours_abandon_the_unmasking() {
    // Degree 4, threshold 4: a device whose neighbour leaves before
    // unmasking has only 3 of its 4 shares revealed.
    let (mut h, q) = Harness::new(context(4, 4, 5, 16), 12, &[(2, DropAt::Unmask)]);
    match h.run(q, &mut *no_tamper()) {
        Output::Abandoned { stage, reason } => {
            assert_eq!(stage, Stage::Unmask);
            assert!(reason.contains("3 distinct shares, 4 needed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_device_without_shares_leaves_and_a_silent_stage_ends_at_its_deadline() {
    // Device 4 is sent no shares, so it refuses to go on (too few
    // neighbours): the round still finishes with the others.
    let (mut h, q) = Harness::new(context(3, 6, 5, 8), 10, &[]);
    let mut tamper = |d: DeviceId, m: &mut ServerMessage| {
        if let (4, ServerMessage::Shares(s)) = (d, m) {
            s.clear();
        }
    };
    match h.run(q, &mut tamper) {
        Output::Finished { sum, survivors } => {
            assert!(!survivors.contains(&4));
            assert_eq!(sum, h.expected_sum(&survivors));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.refused[0],
        (4, DeviceError::TooFewNeighbours { .. })
    ));

    // Nobody answers and nobody is reported gone: the stage waits until its
    // deadline, then ends the round.
    let mut s = Server::new(context(3, 6, 5, 8), 0..10, 0, 500, 1).unwrap();
    assert!(s.tick(499).is_empty());
    match &s.tick(500)[..] {
        [Output::Abandoned { stage, reason }] => {
            assert_eq!(*stage, Stage::Advertise);
            assert!(reason.contains("0 devices advertised"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn devices_refuse_to_reveal_both_shares_of_one_device() {
    let (mut h, q) = Harness::new(context(3, 6, 5, 8), 12, &[]);
    let mut tamper = |d: DeviceId, m: &mut ServerMessage| {
        if let (0, ServerMessage::Unmask { survivors, dropped }) = (d, m) {
            // Claim a survivor dropped out, to get its mask key too.
            dropped.push(survivors[0]);
        }
    };
    let _ = h.run(q, &mut tamper);
    assert!(
        matches!(h.refused[..], [(0, DeviceError::BothShares(_))]),
        "{:?}",
        h.refused
    );
}

#[test]
fn a_device_answers_one_unmasking_request_only() {
    let ctx = context(2, 2, 2, 4);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let pki = SimPki::new(FLEET);
    let mut devices = Vec::new();
    let mut ads = Vec::new();
    for d in 0..3u64 {
        let (dev, ad) = Device::new(d, ctx, &SimSigner::new(FLEET, d), &mut rng).unwrap();
        let DeviceMessage::Advertise(ad) = ad else {
            unreachable!()
        };
        devices.push(dev);
        ads.push(ad);
    }
    let mut shares: Vec<EncryptedShare> = Vec::new();
    for (i, dev) in devices.iter_mut().enumerate() {
        let others: Vec<Advertisement> = ads
            .iter()
            .filter(|a| a.device != i as u64)
            .cloned()
            .collect();
        let DeviceMessage::Shares(s) = dev.share(&others, &pki, &mut rng).unwrap() else {
            unreachable!()
        };
        shares.extend(s);
    }
    let to0: Vec<EncryptedShare> = shares.iter().filter(|s| s.to == 0).cloned().collect();
    devices[0].mask(&to0, vec![1, 2, 3, 4]).unwrap();
    // First request: device 1 survived, device 2 dropped.
    devices[0].reveal(&[1], &[2]).unwrap();
    // A second request, now saying device 2 survived: refused.
    assert!(matches!(
        devices[0].reveal(&[1, 2], &[]),
        Err(DeviceError::OutOfOrder { .. })
    ));
}

#[test]
fn a_substituted_key_is_refused_by_the_neighbours() {
    let (mut h, q) = Harness::new(context(3, 6, 5, 8), 12, &[]);
    // The server replaces device 7's mask key (to learn masks it should not).
    let mut tamper = |_d: DeviceId, m: &mut ServerMessage| {
        if let ServerMessage::Neighbours(ads) = m {
            for ad in ads.iter_mut().filter(|a| a.device == 7) {
                ad.mask_key = [9u8; 32];
            }
        }
    };
    let _ = h.run(q, &mut tamper);
    // Every neighbour of device 7 refuses the round (the devices left
    // without enough neighbours then give up too).
    let forged: Vec<DeviceId> = h
        .refused
        .iter()
        .filter(|(_, e)| *e == DeviceError::Forged(7))
        .map(|(d, _)| *d)
        .collect();
    assert_eq!(forged.len(), 6, "{:?}", h.refused);
    assert!(
        h.refused.iter().all(|(_, e)| matches!(
            e,
            DeviceError::Forged(7) | DeviceError::TooFewNeighbours { .. }
        )),
        "{:?}",
        h.refused
    );
    // And a credential of another device with its valid signature is
    // refused too.
    let ctx = context(2, 2, 2, 4);
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (mut dev, _) = Device::new(0, ctx, &SimSigner::new(FLEET, 0), &mut rng).unwrap();
    let (_, ad1) = Device::new(1, ctx, &SimSigner::new(FLEET, 5), &mut rng).unwrap();
    let (_, ad2) = Device::new(2, ctx, &SimSigner::new(FLEET, 2), &mut rng).unwrap();
    let (DeviceMessage::Advertise(ad1), DeviceMessage::Advertise(ad2)) = (ad1, ad2) else {
        unreachable!()
    };
    assert_eq!(
        dev.share(&[ad1, ad2], &SimPki::new(FLEET), &mut rng)
            .unwrap_err(),
        DeviceError::Forged(1)
    );
}

#[test]
fn hostile_device_messages_are_refused_and_cost_only_their_sender() {
    let ctx = context(2, 4, 3, 8);
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut s = Server::new(ctx, 0..6, 0, 1_000, 1).unwrap();
    let mut devices = BTreeMap::new();
    let mut out = Vec::new();
    // A device that was not selected.
    let (_, stranger) = Device::new(77, ctx, &SimSigner::new(FLEET, 77), &mut rng).unwrap();
    assert!(matches!(
        &s.receive(77, stranger, 0)[..],
        [Output::Refused(_)]
    ));
    // An advertisement for another device.
    let (_, other) = Device::new(4, ctx, &SimSigner::new(FLEET, 4), &mut rng).unwrap();
    assert!(matches!(&s.receive(5, other, 0)[..], [Output::Refused(_)]));
    for d in 0..5u64 {
        let (dev, ad) = Device::new(d, ctx, &SimSigner::new(FLEET, d), &mut rng).unwrap();
        devices.insert(d, dev);
        out.extend(s.receive(d, ad, 0));
    }
    // Device 5 was refused: the stage closed with the five others.
    assert_eq!(s.stage(), Stage::Share);
    // A second advertisement in the share stage.
    let (_, again) = Device::new(0, ctx, &SimSigner::new(FLEET, 0), &mut rng).unwrap();
    assert!(matches!(&s.receive(0, again, 0)[..], [Output::Refused(_)]));
    // Device 1 answers with shares addressed to the wrong devices.
    let bad = DeviceMessage::Shares(vec![EncryptedShare {
        from: 1,
        to: 1,
        ciphertext: vec![0; fleet_secagg::message::CIPHERTEXT_LEN],
    }]);
    assert!(matches!(&s.receive(1, bad, 0)[..], [Output::Refused(_)]));
    let pki = SimPki::new(FLEET);
    for o in out {
        if let Output::Send(d, ServerMessage::Neighbours(ads)) = o {
            if d == 0 || d == 1 {
                continue;
            }
            let m = devices
                .get_mut(&d)
                .unwrap()
                .share(&ads, &pki, &mut rng)
                .unwrap();
            s.receive(d, m, 0);
        }
    }
    // Devices 0 and 1 were refused: the stage closed with 2, 3 and 4.
    assert_eq!(s.stage(), Stage::MaskedInput);
    // A masked input of the wrong length.
    let short = DeviceMessage::Masked(fleet_secagg::message::Words(vec![0; 7]));
    assert!(matches!(&s.receive(2, short, 0)[..], [Output::Refused(_)]));
    // An oversized one.
    let long = DeviceMessage::Masked(fleet_secagg::message::Words(vec![0; 1 << 20]));
    assert!(matches!(&s.receive(3, long, 0)[..], [Output::Refused(_)]));
}

#[test]
fn quantised_updates_sum_through_the_protocol() {
    let dim = 1000usize;
    let n = 30u64;
    let q = Quantiser::plan(dim, 1.0, 0.0, 20, n as usize, 11).unwrap();
    let ctx = context(4, 8, 20, q.padded);
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let updates: Vec<Vec<f32>> = (0..n)
        .map(|_| (0..dim).map(|_| rng.random_range(-0.02..0.02)).collect())
        .collect();
    let (mut h, queue) = Harness::new(ctx, n, &[(5, DropAt::Masked)]);
    for (d, u) in updates.iter().enumerate() {
        h.inputs.insert(d as u64, q.encode(u, &mut rng).unwrap());
    }
    let Output::Finished { sum, survivors } = h.run(queue, &mut *no_tamper()) else {
        panic!("the round did not finish")
    };
    assert_eq!(sum, h.expected_sum(&survivors));
    let decoded = q.decode(&sum).unwrap();
    let mut plain = vec![0f64; dim];
    for &d in &survivors {
        for (p, &v) in plain.iter_mut().zip(&updates[d as usize]) {
            *p += f64::from(v);
        }
    }
    let worst = decoded
        .iter()
        .zip(&plain)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    // Rounding moves each device's rotated coordinates by less than one
    // integer; after the rotation back the error per coordinate has
    // standard deviation about √n/(2s).
    let bound = 6.0 * (survivors.len() as f64).sqrt() / (2.0 * q.scale);
    assert!(worst < bound, "worst coordinate error {worst} > {bound}");
}

#[test]
fn a_thousand_devices_finish_with_the_exact_sum() {
    let drops: Vec<(DeviceId, DropAt)> = (0..1000)
        .step_by(37)
        .map(|d| {
            let at = [
                DropAt::Advertise,
                DropAt::Share,
                DropAt::Masked,
                DropAt::Unmask,
            ][(d % 4) as usize];
            (d, at)
        })
        .collect();
    let (sum, survivors, h) = finish(1000, context(8, 20, 900, 32), &drops);
    assert!(survivors.len() >= 900);
    assert_eq!(sum, h.expected_sum(&survivors));
    let set: BTreeSet<DeviceId> = survivors.iter().copied().collect();
    for (d, at) in drops {
        assert_eq!(
            set.contains(&d),
            at == DropAt::Unmask,
            "device {d} dropped at {at:?}"
        );
    }
}

#[test]
fn masked_words_travel_as_four_bytes_each() {
    let m = DeviceMessage::Masked(fleet_secagg::message::Words(vec![u32::MAX, 1, 0x0102_0304]));
    let bytes = postcard::to_allocvec(&m).unwrap();
    // Variant tag, length 12, then the words little-endian.
    assert_eq!(bytes.len(), 1 + 1 + 12);
    assert_eq!(postcard::from_bytes::<DeviceMessage>(&bytes).unwrap(), m);
    // A length that is not a multiple of four is refused.
    let mut bad = bytes.clone();
    bad[1] = 11;
    bad.pop();
    assert!(postcard::from_bytes::<DeviceMessage>(&bad).is_err());
}
