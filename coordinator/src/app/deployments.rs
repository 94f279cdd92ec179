//! The deployed model: the answer to `GetDeployment`, the objects devices
//! may fetch, and the bookkeeping around artifact builds (what to build,
//! recording the result). The build itself runs in the driver, off the lock.

use std::sync::Arc;
use std::time::Duration;

use fleet_models::ModelSpec;
use fleet_models::export::Variant;
use fleet_protocol::ErrorCode;
use fleet_protocol::message::{
    CoordinatorMessage, DeployedArtifact, Deployment, ObjectId, ObjectRef, bytes_to_params,
};
use tracing::{info, warn};

use super::App;
use crate::runner::refuse;
use crate::store::{ArtifactRow, ObjectSink, Store, StoreError};

/// What a device asking for the deployment gets, or what must happen first.
#[derive(Debug)]
pub enum DeploymentAnswer {
    /// The reply.
    Reply(Box<CoordinatorMessage>),
    /// The deployed model's artifacts are not built yet.
    Build(ObjectId),
}

/// An object a device asked for.
#[derive(Debug)]
pub enum Fetchable {
    /// Its bytes.
    Bytes(Arc<Vec<u8>>),
    /// Not an object devices may fetch.
    Unknown,
    /// An artifact of the deployed model whose stored file is damaged or
    /// missing (it is being built again), or a storage failure; the reason.
    Damaged(String),
}

/// What must be done for a model's artifacts.
#[derive(Debug)]
pub enum ArtifactJob {
    /// Build them from these parameters and write them to `objects`.
    Build {
        /// The architecture.
        spec: ModelSpec,
        /// The model version's parameters.
        params: Vec<f32>,
        /// The round that produced it.
        version: u64,
        /// Where the built objects go.
        objects: ObjectSink,
    },
    /// Nothing: both are recorded, they cannot be built (recorded as
    /// such), or the store failed (logged).
    Nothing,
}

/// An artifact's build result: its stored object, or why there is none.
pub type BuiltArtifact = (Variant, Result<ObjectRef, String>);

impl App {
    /// The next model version whose artifacts are to be built.
    pub fn next_build(&mut self) -> Option<ObjectId> {
        self.builds.pop_front()
    }

    /// What to do for `model`'s artifacts. A model whose artifacts cannot
    /// be built gets the reason recorded for both variants.
    pub fn artifact_job(&mut self, model: &ObjectId) -> ArtifactJob {
        let short = &model.to_string()[..12];
        let reason = match plan_build(&self.store, model) {
            Ok(Plan::Done) => return ArtifactJob::Nothing,
            Ok(Plan::Build {
                spec,
                params,
                version,
            }) => {
                return ArtifactJob::Build {
                    spec,
                    params,
                    version,
                    objects: self.store.object_sink(),
                };
            }
            Ok(Plan::Unusable(reason)) => reason,
            Err(e) => {
                self.storage_failed(&format!("reading model {short}"), &e);
                return ArtifactJob::Nothing;
            }
        };
        warn!("model {short}: no inference artifacts: {reason}");
        let rows = [
            (Variant::Float, Err(reason.clone())),
            (Variant::Int8, Err(reason)),
        ];
        if let Err(e) = self.store.put_artifacts(model, &rows) {
            self.storage_failed(&format!("recording model {short}'s artifacts"), &e);
        }
        ArtifactJob::Nothing
    }

    /// Records `model`'s built artifacts (`name` v`version`, built in `took`).
    pub fn record_artifacts(
        &mut self,
        model: &ObjectId,
        rows: &[BuiltArtifact],
        name: &str,
        version: u64,
        took: Duration,
    ) {
        let short = &model.to_string()[..12];
        if let Err(e) = self.store.put_artifacts(model, rows) {
            self.storage_failed(&format!("recording model {short}'s artifacts"), &e);
            return;
        }
        let summary: Vec<String> = rows
            .iter()
            .map(|(variant, r)| match r {
                Ok(o) => format!("{variant} {} ({} bytes)", &o.id.to_string()[..12], o.size),
                Err(e) => format!("{variant} not built: {e}"),
            })
            .collect();
        info!(
            "model {short} ({name} v{version}): artifacts {} in {:.2} s",
            summary.join(", "),
            took.as_secs_f64()
        );
    }

    /// An artifact build that could not write its objects.
    pub fn artifacts_unwritable(&mut self, model: &ObjectId, e: &StoreError) {
        let what = format!("writing model {}'s artifacts", &model.to_string()[..12]);
        self.storage_failed(&what, e);
    }

    /// The answer to `GetDeployment`: the deployed model with the artifact
    /// of the variant its task chose, or the model to build first.
    pub fn deployment(&mut self) -> DeploymentAnswer {
        match deployment(&self.store) {
            Ok(answer) => answer,
            Err(e) => DeploymentAnswer::Reply(Box::new(CoordinatorMessage::Error(
                self.storage_failed("reading the deployment", &e),
            ))),
        }
    }

    /// The bytes of `object` if a device may fetch it: the running task's
    /// model, the deployed one, or an artifact of the deployed one.
    pub fn fetch(&mut self, object: &ObjectId) -> Fetchable {
        match self.fetchable(object) {
            Ok(f) => f,
            Err(e) => Fetchable::Damaged(self.storage_failed("reading an object", &e).message),
        }
    }

    fn fetchable(&mut self, object: &ObjectId) -> Result<Fetchable, StoreError> {
        if let Some(r) = &self.runner {
            let (bytes, r) = r.model();
            if r.id == *object {
                return Ok(Fetchable::Bytes(bytes));
            }
        } else if let Some(task) = self.replica.as_ref().and_then(|r| r.running) {
            // The task runs on another replica: its current model, from the
            // store (kept while it is the one asked for).
            if let Some((id, bytes)) = &self.shared_model
                && id == object
            {
                return Ok(Fetchable::Bytes(bytes.clone()));
            }
            if self.store.task_model(task)? == Some(*object) {
                let bytes = Arc::new(self.store.get_object(object)?);
                self.shared_model = Some((*object, bytes.clone()));
                return Ok(Fetchable::Bytes(bytes));
            }
        }
        let Some((_, deployed)) = self.store.deployment()? else {
            self.fetch_cache.clear();
            return Ok(Fetchable::Unknown);
        };
        if deployed == *object {
            return Ok(Fetchable::Bytes(self.verified(&deployed, object)?));
        }
        if self.store.artifact_model(object)? != Some(deployed) {
            return Ok(Fetchable::Unknown);
        }
        match self.verified(&deployed, object) {
            Ok(bytes) => Ok(Fetchable::Bytes(bytes)),
            // A damaged or lost artifact is rebuilt, not fatal: the model it
            // comes from is intact.
            Err(StoreError::Corrupt(_) | StoreError::Io(_)) => {
                self.store.remove_object(object)?;
                self.store.forget_artifacts(&deployed)?;
                self.queue_build(deployed);
                Ok(Fetchable::Damaged(format!(
                    "the stored artifact {} is damaged or missing; it is being built again, \
                     ask for the deployment again shortly",
                    &object.to_string()[..12]
                )))
            }
            Err(e) => Err(e),
        }
    }
}

impl App {
    /// The verified bytes of `object`, a fetchable object of the `deployed`
    /// model, from the cache while its file is unchanged: a device's fetch
    /// costs a `stat`, not a read and a hash of the whole object. The cache
    /// holds the objects of one deployed model (the model and its two
    /// artifacts) and is emptied when the deployment changes; an object whose
    /// file changed (damaged, rewritten) is read and verified again.
    fn verified(
        &mut self,
        deployed: &ObjectId,
        object: &ObjectId,
    ) -> Result<Arc<Vec<u8>>, StoreError> {
        if self.fetch_cache.deployed != Some(*deployed) {
            self.fetch_cache.clear();
            self.fetch_cache.deployed = Some(*deployed);
        }
        let stamp = self.store.object_stamp(object)?;
        if let Some((s, bytes)) = self.fetch_cache.objects.get(object)
            && *s == stamp
        {
            return Ok(bytes.clone());
        }
        self.fetch_cache.objects.remove(object);
        let bytes = Arc::new(self.store.get_object(object)?);
        self.fetch_cache
            .objects
            .insert(*object, (stamp, bytes.clone()));
        self.fetch_cache.reads += 1;
        Ok(bytes)
    }
}

/// Verified objects of the deployed model (see [`App::verified`]).
#[derive(Debug, Default)]
pub struct FetchCache {
    deployed: Option<ObjectId>,
    objects: std::collections::HashMap<ObjectId, (ObjectStamp, Arc<Vec<u8>>)>,
    /// Objects read and hashed so far (for tests).
    pub reads: u64,
}

type ObjectStamp = (u64, Option<std::time::SystemTime>);

impl FetchCache {
    fn clear(&mut self) {
        self.deployed = None;
        self.objects.clear();
    }
}

/// The refusal when the deployed model's artifacts are still missing after
/// a build.
pub fn artifacts_unavailable(model: &ObjectId) -> CoordinatorMessage {
    refuse(
        ErrorCode::Internal,
        format!(
            "the inference artifacts of deployed model {} are not available; ask again later",
            &model.to_string()[..12]
        ),
    )
}

fn deployment(store: &Store) -> Result<DeploymentAnswer, StoreError> {
    let none = || {
        Ok(DeploymentAnswer::Reply(Box::new(
            CoordinatorMessage::Deployment(None),
        )))
    };
    let Some((version, model)) = store.deployment()? else {
        return none();
    };
    let Some(row) = store.model_row(&model)? else {
        return none();
    };
    let Some(task) = store.task(row.task)? else {
        return none();
    };
    let variant = task.spec.variant;
    let artifacts = store.artifacts(&model)?;
    Ok(match artifacts.into_iter().find(|a| a.variant == variant) {
        None => DeploymentAnswer::Build(model),
        Some(ArtifactRow {
            built: Err(reason), ..
        }) => DeploymentAnswer::Reply(Box::new(refuse(
            ErrorCode::Internal,
            format!(
                "deployed model {} has no {variant} inference artifact: {reason}",
                &model.to_string()[..12]
            ),
        ))),
        Some(ArtifactRow {
            built: Ok(object), ..
        }) => DeploymentAnswer::Reply(Box::new(CoordinatorMessage::Deployment(Some(Deployment {
            version,
            model: ObjectRef {
                id: model,
                size: row.size,
            },
            spec: task.spec.model,
            artifact: DeployedArtifact {
                object,
                variant,
                model_version: row.round,
            },
        })))),
    })
}

/// What the store says of a model's artifacts.
enum Plan {
    /// Both are recorded.
    Done,
    /// They cannot be built, for this reason.
    Unusable(String),
    /// Build them from these parameters.
    Build {
        spec: ModelSpec,
        params: Vec<f32>,
        version: u64,
    },
}

fn plan_build(store: &Store, model: &ObjectId) -> Result<Plan, StoreError> {
    if store.artifacts(model)?.len() >= 2 {
        return Ok(Plan::Done);
    }
    let Some(row) = store.model_row(model)? else {
        return Ok(Plan::Unusable("not a stored model version".into()));
    };
    let Some(task) = store.task(row.task)? else {
        return Ok(Plan::Unusable(format!("task {} is unknown", row.task)));
    };
    let bytes = match store.get_object(model) {
        Ok(b) => b,
        Err(StoreError::Io(e)) => {
            return Ok(Plan::Unusable(format!("model object unreadable: {e}")));
        }
        Err(StoreError::Corrupt(e)) => return Ok(Plan::Unusable(e)),
        Err(e) => return Err(e),
    };
    let spec = task.spec.model;
    match bytes_to_params(&bytes).filter(|p| p.len() == spec.layout().total) {
        Some(params) => Ok(Plan::Build {
            spec,
            params,
            version: row.round,
        }),
        None => Ok(Plan::Unusable(format!(
            "model object does not fit the layout of {}",
            spec.name()
        ))),
    }
}
