//! What a device computes for a plan: local training from the global model,
//! the update (trained minus global), an optional change by the caller
//! (the simulator's Byzantine devices use it), clipping and noise when the
//! plan is private, and the wire encoding. The agent and the simulator both
//! call [`plan_update`] with the plan the device received, so a simulated
//! device's update is made exactly like a real one's, and [`secure_input`]
//! when the plan has secure aggregation.

use fleet_aggregation::codec::{Codec, decode};
use fleet_aggregation::privacy::{DpConfig, privatize_client_update};
use fleet_models::{Backend, DataRef, ModelSpec, TrainConfig, train_local};
use fleet_protocol::message::{Plan, SecurePlan};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An encoded update and what it was trained on.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The update in the plan's codec.
    pub bytes: Vec<u8>,
    /// Local examples.
    pub examples: usize,
    /// Mean local training loss.
    pub loss: f32,
}

/// The seed of a device's local training (batch order and the codec's
/// rounding) for one round of a task whose plan carries `plan_seed`:
/// distinct for every (device, round) below 2^32 each.
pub fn training_seed(plan_seed: u64, device: u64, round: u64) -> u64 {
    plan_seed ^ (round << 32) ^ device
}

/// What `device` computes for `plan` from the global model `global` on its
/// `data`: the one training function of agents and simulated devices.
/// Training and the codec's rounding are seeded by [`training_seed`] from
/// the plan; `alter` may change the raw update before privatisation (the
/// simulator's Byzantine devices).
pub fn plan_update(
    plan: &Plan,
    device: u64,
    global: &[f32],
    data: DataRef<'_>,
    alter: impl FnOnce(&mut [f32]),
) -> Result<ClientUpdate, String> {
    let train = TrainConfig {
        seed: training_seed(plan.train.seed, device, plan.round),
        ..plan.train
    };
    // With secure aggregation the quantiser clips the update and adds the
    // device's share of the (Skellam) noise: the update leaves training
    // raw, in f32.
    let dp = if plan.secure.is_some() {
        None
    } else {
        plan.dp.as_ref()
    };
    client_update(&plan.spec, global, data, &train, dp, &plan.codec, alter)
}

/// Trains `spec` from `global` on `data` with `train` (its seed also seeds
/// the codec's rounding), lets `alter` change the raw update, then clips and
/// noises it per `dp` and encodes it with `codec`.
fn client_update(
    spec: &ModelSpec,
    global: &[f32],
    data: DataRef<'_>,
    train: &TrainConfig,
    dp: Option<&DpConfig>,
    codec: &Codec,
    alter: impl FnOnce(&mut [f32]),
) -> Result<ClientUpdate, String> {
    let out =
        train_local(spec, global, data, train, Backend::DEFAULT).map_err(|e| e.to_string())?;
    let mut delta = out.delta(global);
    alter(&mut delta);
    if let Some(dp) = dp {
        privatize_client_update(&mut delta, dp).map_err(|e| e.to_string())?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(train.seed);
    let bytes = codec.encode(&delta, &mut rng).map_err(|e| e.to_string())?;
    Ok(ClientUpdate {
        bytes,
        examples: out.examples,
        loss: out.mean_loss,
    })
}

/// A secure round's input from the encoded update `bytes` of a model with
/// `len` parameters: decoded, then clipped, rotated, scaled, rounded and
/// noised with the device's share of the round's Skellam noise by the
/// round's quantiser. `rng` must be secret (the agent seeds it from the
/// operating system): the rounding and the noise are what protect the
/// update.
pub fn secure_input(
    secure: &SecurePlan,
    bytes: &[u8],
    len: usize,
    rng: &mut impl RngCore,
) -> Result<Vec<u32>, String> {
    let values = decode(bytes, len).map_err(|e| e.to_string())?;
    secure
        .quantiser
        .encode(&values, rng)
        .map_err(|e| e.to_string())
}
