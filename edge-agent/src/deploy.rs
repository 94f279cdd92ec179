//! The deployment following service: the deployed model is fetched from
//! the coordinator, checked, persisted, and installed into [`Serving`].
//!
//! A [`Deployer`] asks for the deployment (`GetDeployment`) at start and
//! then every `deployment_check_secs` ([`Deployer::follow`]), each time in
//! a short session of its own. A new artifact is fetched in chunks (a
//! download cut short resumes from the bytes held, also after a restart)
//! and accepted only if it has the announced size and SHA-256, its metadata
//! names the announced variant, model version and architecture, and tract
//! plans it and a trial run gives finite logits ([`Model::load`]). Only
//! then is it persisted and swapped in; the version it replaces is kept for
//! rollback. A bad artifact changes nothing and is not fetched again (a new
//! deployment is). [`Deployer::restore`] serves the persisted artifact
//! before any connection, so the device serves while the coordinator is
//! unreachable.
//!
//! Files (`<state>/deployment/`): `current.json` (what serves: a
//! [`Installed`] record), `<sha256>.onnx` (its artifact), and while a
//! download is unfinished `partial.json` + `partial.bin`. This module is the
//! only writer of that directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::message::{AgentMessage, CoordinatorMessage, DeployedArtifact, Deployment};
use fleet_protocol::message::{ObjectId, ObjectRef};
use fleet_protocol::transfer::Assembler;
use serde::{Deserialize, Serialize};

use crate::inference::{InferenceError, Model};
use crate::log::log;
pub use crate::serving::Serving;
use crate::session::{Coordinator, Session, SessionError};
use crate::state::StateDir;

/// Largest artifact accepted (bytes).
pub const MAX_ARTIFACT_BYTES: u64 = 256 << 20;

/// What serves now, as recorded in `current.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    /// The coordinator's deployment number it came with.
    pub deployment: u64,
    /// The deployment as announced (artifact, variant, model version, spec).
    pub announced: Deployment,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// The coordinator deploys nothing.
    NothingDeployed,
    /// The deployed artifact is the one serving (or one already refused).
    Unchanged,
    /// A new artifact serves now.
    Installed {
        /// Deployment number.
        deployment: u64,
        /// Model version that served before, if any.
        from: Option<u64>,
        /// Model version serving now.
        to: u64,
    },
}

/// Why a deployment was not installed. The serving model is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The session failed or the coordinator refused; the check is retried later.
    #[error("deployment check failed: {0}")]
    Link(#[from] SessionError),
    /// The downloaded bytes are not the announced artifact (size or
    /// SHA-256); it is fetched again at the next check.
    #[error("deployed artifact refused, the previous model keeps serving: {0}")]
    Download(String),
    /// The artifact is intact but unusable: its metadata does not match
    /// the announcement, or tract cannot plan or run it. It is not fetched
    /// again until another artifact is deployed.
    #[error("deployed artifact refused, the previous model keeps serving: {0}")]
    Artifact(String),
    /// The state directory could not be written.
    #[error("cannot persist the deployed artifact: {0}")]
    Persist(String),
}

/// Checks `bytes` against the deployment `d` announced, and plans them.
/// CPU-bound (tract optimisation and a trial run): call it off the runtime.
pub fn verify(d: &Deployment, bytes: Vec<u8>) -> Result<Model, DeployError> {
    let a = &d.artifact;
    if bytes.len() as u64 != a.object.size {
        return Err(DeployError::Download(format!(
            "artifact {} has {} bytes, {} were announced (truncated or padded); it is \
             fetched again at the next check",
            short(&a.object.id),
            bytes.len(),
            a.object.size
        )));
    }
    let model = Model::load(bytes, Some(&a.object.id.to_string())).map_err(|e| {
        // Bytes that are not the announced object were damaged on the way:
        // fetched again. Anything else is the artifact's own fault.
        let damaged = matches!(
            e,
            InferenceError::Artifact(fleet_models::export::ExportError::HashMismatch { .. })
        );
        let text = e.to_string();
        if damaged {
            DeployError::Download(text)
        } else {
            DeployError::Artifact(text)
        }
    })?;
    let meta = model.meta();
    if meta.variant != a.variant || meta.version != a.model_version || meta.spec != d.spec {
        return Err(DeployError::Artifact(format!(
            "artifact {} holds {} {} version {}, but the deployment announced {} {} version {}",
            short(&a.object.id),
            meta.spec.name(),
            meta.variant,
            meta.version,
            d.spec.name(),
            a.variant,
            a.model_version
        )));
    }
    Ok(model)
}

fn short(id: &ObjectId) -> String {
    id.to_string()[..12].to_string()
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Writes `bytes` to `path` atomically and durably: a synced temporary
/// file renamed, then its directory synced so that the rename survives a
/// power cut.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// A download in progress, kept across checks and restarts.
#[derive(Debug, Serialize, Deserialize)]
struct PartialRecord {
    object: ObjectRef,
}

/// Fetches, checks, persists and installs deployed artifacts; see the module docs.
#[derive(Debug)]
pub struct Deployer {
    dir: PathBuf,
    serving: Arc<Serving>,
    installed: Option<Installed>,
    /// An artifact refused as unusable: not fetched again.
    refused: Option<ObjectId>,
    partial: Option<Assembler>,
}

impl Deployer {
    /// A deployer writing under `state`'s `deployment/` directory and
    /// installing into `serving`. Nothing is read yet: see [`Deployer::restore`].
    pub fn new(state: &StateDir, serving: Arc<Serving>) -> Self {
        Self {
            dir: state.dir().join("deployment"),
            serving,
            installed: None,
            refused: None,
            partial: None,
        }
    }

    /// The directory of the persisted artifact.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What serves now.
    pub fn installed(&self) -> Option<&Installed> {
        self.installed.as_ref()
    }

    /// Loads the persisted artifact (checked again, as when it arrived) and
    /// serves it, and picks up an unfinished download. Returns the model
    /// version now serving; `Ok(None)` when nothing was persisted. A
    /// persisted artifact that fails its checks is removed (it is fetched
    /// again) and reported as an error.
    pub fn restore(&mut self) -> Result<Option<u64>, DeployError> {
        if let Some(asm) = self.read_partial() {
            self.partial = Some(asm);
        }
        let record = self.dir.join("current.json");
        let installed: Installed = match std::fs::read(&record) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                let _ = std::fs::remove_file(&record);
                DeployError::Artifact(format!("{}: {e}; it is fetched again", record.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DeployError::Persist(io_err(&record, e))),
        };
        let file = self.artifact_path(&installed.announced.artifact);
        let bytes = std::fs::read(&file).unwrap_or_default();
        match verify(&installed.announced, bytes) {
            Ok(model) => {
                let version = model.version();
                self.serving.install(model);
                self.serving.set_deployment(installed.deployment);
                self.installed = Some(installed);
                Ok(Some(version))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&record);
                let _ = std::fs::remove_file(&file);
                Err(DeployError::Artifact(format!(
                    "persisted artifact {}: {e}; it is fetched again",
                    file.display()
                )))
            }
        }
    }

    fn artifact_path(&self, a: &DeployedArtifact) -> PathBuf {
        self.dir.join(format!("{}.onnx", a.object.id))
    }

    fn read_partial(&self) -> Option<Assembler> {
        let meta = std::fs::read(self.dir.join("partial.json")).ok()?;
        let record: PartialRecord = serde_json::from_slice(&meta).ok()?;
        let held = std::fs::read(self.dir.join("partial.bin")).ok()?;
        Assembler::resume(record.object, MAX_ARTIFACT_BYTES, held).ok()
    }

    /// Keeps the bytes of an unfinished download for a later check or a restart.
    fn save_partial(&self, asm: &Assembler) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        write_atomic(&self.dir.join("partial.bin"), asm.held())?;
        let record = serde_json::to_vec(&PartialRecord {
            object: asm.target(),
        })
        .expect("plain data serialises");
        write_atomic(&self.dir.join("partial.json"), &record)
    }

    fn clear_partial(&mut self) {
        self.partial = None;
        let _ = std::fs::remove_file(self.dir.join("partial.json"));
        let _ = std::fs::remove_file(self.dir.join("partial.bin"));
    }

    /// Whether `d` needs fetching: another artifact than the serving one,
    /// and not one refused before.
    pub fn wants(&self, d: &Deployment) -> bool {
        let id = d.artifact.object.id;
        self.installed
            .as_ref()
            .is_none_or(|i| i.announced.artifact.object.id != id)
            && self.refused != Some(id)
    }

    /// Checks downloaded `bytes` against `d`, persists and installs them
    /// when they pass. The file work and the checks run on the blocking pool.
    pub async fn accept(&mut self, d: Deployment, bytes: Vec<u8>) -> Result<Checked, DeployError> {
        let dir = self.dir.clone();
        let announced = d.clone();
        let model = tokio::task::spawn_blocking(move || install_files(&dir, &announced, bytes))
            .await
            .map_err(|e| DeployError::Artifact(format!("checking the artifact failed: {e}")))?;
        let model = match model {
            Ok(m) => m,
            Err(e) => {
                if matches!(e, DeployError::Artifact(_)) {
                    self.refused = Some(d.artifact.object.id);
                }
                return Err(e);
            }
        };
        let to = model.version();
        let from = self.serving.install(model);
        self.serving.set_deployment(d.version);
        self.installed = Some(Installed {
            deployment: d.version,
            announced: d.clone(),
        });
        Ok(Checked::Installed {
            deployment: d.version,
            from,
            to,
        })
    }

    /// One check over its own connection: asks for the deployment and, when
    /// it is new, fetches, checks, persists and installs its artifact.
    pub async fn check(
        &mut self,
        endpoint: &quinn::Endpoint,
        coordinator: SocketAddr,
        server_name: &str,
    ) -> Result<Checked, DeployError> {
        self.check_with(&Coordinator::new(
            endpoint.clone(),
            coordinator,
            server_name,
        ))
        .await
    }

    async fn check_with(&mut self, coordinator: &Coordinator) -> Result<Checked, DeployError> {
        let mut session = coordinator.open().await?;
        let result = self.session(&mut session).await;
        session.close(fleet_protocol::close::DONE, b"done");
        result
    }

    async fn session(&mut self, session: &mut Session) -> Result<Checked, DeployError> {
        let d = match session.call(&AgentMessage::GetDeployment).await? {
            CoordinatorMessage::Deployment(None) => return Ok(Checked::NothingDeployed),
            CoordinatorMessage::Deployment(Some(d)) => d,
            other => return Err(SessionError::unexpected("GetDeployment", other).into()),
        };
        if !self.wants(&d) {
            return Ok(Checked::Unchanged);
        }
        let target = d.artifact.object;
        let mut asm = match self.partial.take() {
            Some(a) if a.target() == target => a,
            _ => {
                self.clear_partial();
                Assembler::new(target, MAX_ARTIFACT_BYTES)
                    .map_err(|e| DeployError::Artifact(e.to_string()))?
            }
        };
        let fetched = fetch(session, &mut asm).await;
        if let Err(e) = fetched {
            // Keep what arrived: the next check resumes from there.
            if asm.received() > 0 {
                let _ = self.save_partial(&asm);
            }
            self.partial = Some(asm);
            return Err(e);
        }
        self.clear_partial();
        let bytes = asm.finish().map_err(|e| {
            DeployError::Download(format!("{e}; it is fetched again at the next check"))
        })?;
        self.accept(d, bytes).await
    }

    /// The deployment service: checks at once and then every `every_secs`
    /// seconds, until the task is aborted; each outcome is logged.
    pub async fn follow(mut self, coordinator: Coordinator, every_secs: u64) {
        loop {
            match self.check_with(&coordinator).await {
                Ok(Checked::Installed {
                    deployment,
                    from,
                    to,
                }) => log!(format!(
                    "deployment {deployment}: now serving model version {to}{}",
                    from.map_or(String::new(), |f| format!(" (was {f}, kept for rollback)"))
                )),
                Ok(_) => {}
                Err(e) => log!(e.to_string()),
            }
            tokio::time::sleep(Duration::from_secs(every_secs)).await;
        }
    }
}

/// Writes the artifact under its SHA-256, checks it ([`verify`]), then
/// switches `current.json` to it and removes older artifact files. A
/// refused artifact's file is removed again. A crash at any point leaves
/// `current.json` naming a complete, earlier checked file.
fn install_files(dir: &Path, d: &Deployment, bytes: Vec<u8>) -> Result<Model, DeployError> {
    let persist = DeployError::Persist;
    std::fs::create_dir_all(dir).map_err(|e| persist(io_err(dir, e)))?;
    let file = dir.join(format!("{}.onnx", d.artifact.object.id));
    write_atomic(&file, &bytes).map_err(persist)?;
    let model = match verify(d, bytes) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
    };
    let record = Installed {
        deployment: d.version,
        announced: d.clone(),
    };
    write_atomic(
        &dir.join("current.json"),
        &serde_json::to_vec_pretty(&record).expect("plain data serialises"),
    )
    .map_err(persist)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "onnx") && p != file {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(model)
}

/// Fetches the rest of `asm`'s object: one `Fetch` from the bytes held,
/// then chunks until it is complete.
async fn fetch(session: &mut Session, asm: &mut Assembler) -> Result<(), DeployError> {
    let object = asm.target().id;
    session
        .send(&AgentMessage::Fetch {
            object,
            offset: asm.received(),
        })
        .await?;
    while !asm.is_complete() {
        match session.recv().await? {
            CoordinatorMessage::Chunk {
                object: o,
                offset,
                data,
                ..
            } if o == object => asm
                .accept(offset, &data)
                .map_err(|e| DeployError::Download(e.to_string()))?,
            other => return Err(SessionError::unexpected("the artifact fetch", other).into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
