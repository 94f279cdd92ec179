//! Devices: enrollment, admission of a connection, and the requests a
//! greeted device makes of the running task and the drift monitor.

use fleet_protocol::ErrorCode;
use fleet_protocol::message::{
    Capabilities, CoordinatorMessage, DriftReport, ObjectId, UpdateMeta,
};
use fleet_protocol::tls::{TlsError, certificate_public_key, csr_public_key, role_of};
use tracing::{info, warn};

use fleet_secagg::DeviceMessage;

use super::{App, io};
use crate::limits::{MAX_CSR_LEN, MAX_TOKEN_LEN};
use crate::runner::refuse;
use crate::runner::{Io, Runner};
use crate::store::StoreError;
use crate::store::{DeviceStatus, Enrollment};

/// Whether a device's connection may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Enrolled and not revoked: counted as connected until
    /// [`App::disconnect`].
    Admitted,
    /// Unknown, revoked, or not the certificate issued for the id: close
    /// with [`fleet_protocol::close::REVOKED`] (the agent stops: its
    /// credentials are no good here).
    Refused,
    /// The store could not tell: close with
    /// [`fleet_protocol::close::SHUTDOWN`] (try again later).
    StorageFailed,
}

/// When a device with too little memory for the task's model is told to
/// come back (ms): its memory will not grow soon, the task may change.
const TOO_LITTLE_MEMORY_RETRY_MS: u64 = 15 * 60 * 1000;

impl App {
    /// Enrolls a newcomer holding `token`: a device id and a certificate
    /// for the key of `csr`, or the reason it is refused. A token longer
    /// than [`MAX_TOKEN_LEN`] or a request longer than [`MAX_CSR_LEN`] is
    /// refused before anything is hashed, parsed or looked up.
    pub fn enroll(&mut self, token: &str, csr: &[u8]) -> CoordinatorMessage {
        if token.len() > MAX_TOKEN_LEN {
            self.metrics.reject("enrollment");
            return refuse(
                ErrorCode::UnknownDevice,
                format!("enrollment token longer than {MAX_TOKEN_LEN} bytes"),
            );
        }
        if csr.len() > MAX_CSR_LEN {
            self.metrics.reject("enrollment");
            return refuse(
                ErrorCode::Malformed,
                format!("certificate signing request longer than {MAX_CSR_LEN} bytes"),
            );
        }
        let requested = match csr_public_key(csr) {
            Ok(k) => k,
            Err(e) => {
                self.metrics.reject("enrollment");
                return refuse(ErrorCode::Malformed, e.to_string());
            }
        };
        let ca = &self.ca;
        let days = self.device_cert_days;
        let same_key =
            |cert: &[u8]| certificate_public_key(cert).is_ok_and(|k| k == requested.as_slice());
        let result = self.store.enroll(token, same_key, |id| {
            let cert = ca.issue_device(csr, id, days)?;
            let (_, serial) = role_of(&cert)?;
            Ok::<_, TlsError>((cert.to_vec(), serial))
        });
        match result {
            Ok(Ok(Enrollment {
                device,
                certificate,
                again,
            })) => {
                if again {
                    info!(
                        device,
                        "device {device} enrolled again with the same key (its first answer was \
                         not saved)"
                    );
                } else {
                    self.metrics.enrollments += 1;
                    info!(device, "device {device} enrolled");
                }
                CoordinatorMessage::Enrolled {
                    device,
                    certificate,
                }
            }
            Ok(Err(reason)) => {
                self.metrics.reject("enrollment");
                refuse(ErrorCode::UnknownDevice, reason)
            }
            Err(e) => CoordinatorMessage::Error(self.storage_failed("enrolling", &e)),
        }
    }

    /// A new certificate for `device`, asked on a connection that
    /// presented the certificate with `serial`, for the key of `csr`; valid
    /// `limits.device_cert_days` from now. See [`crate::store::Store::renew`]
    /// for which certificates may ask and how a lost answer is survived. A
    /// request longer than [`MAX_CSR_LEN`] is refused before it is parsed.
    pub fn renew(&mut self, device: u64, serial: &[u8], csr: &[u8]) -> CoordinatorMessage {
        if csr.len() > MAX_CSR_LEN {
            self.metrics.reject("renewal");
            return refuse(
                ErrorCode::Malformed,
                format!("certificate signing request longer than {MAX_CSR_LEN} bytes"),
            );
        }
        if let Err(e) = csr_public_key(csr) {
            self.metrics.reject("renewal");
            return refuse(ErrorCode::Malformed, e.to_string());
        }
        let (ca, days) = (&self.ca, self.device_cert_days);
        let result = self.store.renew(device, serial, || {
            let cert = ca.issue_device(csr, device, days)?;
            let (_, serial) = role_of(&cert)?;
            Ok::<_, TlsError>((cert.to_vec(), serial))
        });
        match result {
            Ok(Ok(certificate)) => {
                self.metrics.renewals += 1;
                info!(
                    device,
                    "device {device} renewed its certificate ({days} days)"
                );
                CoordinatorMessage::Renewed { certificate }
            }
            Ok(Err(reason)) => {
                self.metrics.reject("renewal");
                refuse(ErrorCode::UnknownDevice, reason)
            }
            Err(e) => CoordinatorMessage::Error(self.storage_failed("renewing a certificate", &e)),
        }
    }

    /// A request other than `Enroll` on a connection without a certificate.
    pub fn uncertified(&mut self) -> CoordinatorMessage {
        self.metrics.reject("no_certificate");
        refuse(
            ErrorCode::UnknownDevice,
            "no device certificate: enroll first (edge-agent enroll)",
        )
    }

    /// A connection authenticated as `device` opens: is the device still
    /// enrolled? An admitted connection counts until [`App::disconnect`].
    pub fn connect(&mut self, device: u64, serial: &[u8]) -> Admission {
        match self.store.device_status(device, serial) {
            Ok(DeviceStatus::Active | DeviceStatus::Previous) => {}
            // The renewed certificate is in use: the one before it goes.
            Ok(DeviceStatus::Renewed) => {
                if let Err(e) = self.store.settle_renewal(device) {
                    self.storage_failed(&format!("settling device {device}'s renewal"), &e);
                    return Admission::StorageFailed;
                }
            }
            Ok(DeviceStatus::Unknown | DeviceStatus::Revoked) => {
                self.metrics.reject("unknown_device");
                return Admission::Refused;
            }
            Ok(DeviceStatus::OtherCertificate) => {
                warn!(
                    device,
                    "a certificate for device {device} that this coordinator did not issue to \
                     it (a database restored from a backup?) was refused"
                );
                self.metrics.reject("other_certificate");
                return Admission::Refused;
            }
            Err(e) => {
                self.storage_failed(&format!("checking device {device}"), &e);
                return Admission::StorageFailed;
            }
        }
        if let Err(e) = self.store.touch_device(device) {
            self.storage_failed(&format!("recording device {device}'s visit"), &e);
        }
        *self.connected.entry(device).or_default() += 1;
        self.metrics.connected_devices = self.connected.len() as u64;
        Admission::Admitted
    }

    /// An admitted connection of `device` ended. A lost connection is not a
    /// drop-out: devices on mobile networks reconnect and resume their
    /// uploads; the reporting deadline bounds how long a round waits.
    pub fn disconnect(&mut self, device: u64) {
        if let Some(n) = self.connected.get_mut(&device) {
            *n -= 1;
            if *n == 0 {
                self.connected.remove(&device);
            }
        }
        self.metrics.connected_devices = self.connected.len() as u64;
    }

    /// A frame from a device that could not be read (malformed or too large).
    pub fn frame_refused(&mut self, code: ErrorCode) {
        self.metrics.reject(match code {
            ErrorCode::TooLarge => "too_large",
            _ => "malformed",
        });
    }

    /// Bytes of objects sent to devices.
    pub fn sent(&mut self, bytes: u64) {
        self.metrics.bytes_down += bytes;
    }

    /// `device` asks for work; `eligible` is what it says of its own state
    /// (charging, idle, unmetered).
    pub fn check_in(
        &mut self,
        device: u64,
        capabilities: Capabilities,
        now: u64,
    ) -> CoordinatorMessage {
        let Some(runner) = self.runner.as_mut() else {
            return CoordinatorMessage::ComeBackLater { after_ms: 2_000 };
        };
        if !capabilities.eligible {
            return CoordinatorMessage::ComeBackLater { after_ms: 60_000 };
        }
        // A device with less memory than training the task's model takes
        // would run out of it: it is not selected (and not sent the plan
        // again after every failure), and comes back much later.
        let needed = runner.training_memory_mib();
        if u64::from(capabilities.memory_mib) < needed {
            self.metrics.reject("memory");
            return CoordinatorMessage::ComeBackLater {
                after_ms: TOO_LITTLE_MEMORY_RETRY_MS,
            };
        }
        let mut outcomes = Vec::new();
        let result = runner.check_in(
            io(&mut self.store, &mut self.metrics, now, &mut outcomes),
            device,
        );
        let reply = result.unwrap_or_else(|e| {
            CoordinatorMessage::Error(self.task_storage_failed("selecting devices", &e))
        });
        self.finish_outcomes(outcomes);
        reply
    }

    /// The drift monitor's bins and window, for the deployed model.
    pub fn drift_spec(&self) -> CoordinatorMessage {
        CoordinatorMessage::DriftSpec(self.watch.spec())
    }

    /// A drift summary from `device`.
    pub fn drift_report(&mut self, device: u64, report: &DriftReport) -> CoordinatorMessage {
        match self.watch.report(device, report) {
            Ok(window) => {
                self.metrics.drift_summaries += 1;
                CoordinatorMessage::DriftAccepted { window }
            }
            Err(e) => {
                *self.metrics.drift_rejected.entry(e.reason()).or_default() += 1;
                refuse(ErrorCode::Malformed, format!("drift summary refused: {e}"))
            }
        }
    }

    /// `device` announces an update.
    pub fn begin_upload(&mut self, device: u64, meta: UpdateMeta) -> CoordinatorMessage {
        let Some(runner) = self.runner.as_mut() else {
            return refuse(ErrorCode::NoSuchRound, "no task is running");
        };
        match runner.begin_upload(&self.store, &mut self.metrics, device, meta) {
            Ok(reply) => reply,
            Err(e) => CoordinatorMessage::Error(self.storage_failed("looking up an update", &e)),
        }
    }

    /// A chunk of `device`'s announced update.
    pub fn upload_chunk(
        &mut self,
        device: u64,
        object: ObjectId,
        offset: u64,
        data: &[u8],
        now: u64,
    ) -> CoordinatorMessage {
        let reply = self.with_runner(now, "recording an update", |runner, io| {
            runner.upload_chunk(io, device, object, offset, data)
        });
        if let CoordinatorMessage::Error(e) = &reply {
            warn!(device, "update refused: {e}");
        }
        reply
    }

    /// Hands a device's request to the running task's runner with the
    /// store, metrics and clock, and logs what it did; a storage failure
    /// (while `doing` what is named) suspends the task and is the answer.
    fn with_runner(
        &mut self,
        now: u64,
        doing: &str,
        f: impl FnOnce(&mut Runner, Io<'_>) -> Result<CoordinatorMessage, StoreError>,
    ) -> CoordinatorMessage {
        let Some(runner) = self.runner.as_mut() else {
            return refuse(ErrorCode::NoSuchRound, "no task is running");
        };
        let mut outcomes = Vec::new();
        let result = f(
            runner,
            io(&mut self.store, &mut self.metrics, now, &mut outcomes),
        );
        let reply = result
            .unwrap_or_else(|e| CoordinatorMessage::Error(self.task_storage_failed(doing, &e)));
        self.finish_outcomes(outcomes);
        reply
    }
}

impl App {
    /// A secure-aggregation message of `device` for `round` of `task`, or
    /// a poll. An advertisement must be signed by the key of a device
    /// certificate this coordinator's CA issued for `device`: a bad one is
    /// refused here, before it reaches the round, where it would make every
    /// neighbour of the device give up the round.
    pub fn secure(
        &mut self,
        device: u64,
        task: u64,
        round: u64,
        message: Option<DeviceMessage>,
        now: u64,
    ) -> CoordinatorMessage {
        let Some(runner) = self.runner.as_mut() else {
            return refuse(ErrorCode::NoSuchRound, "no task is running");
        };
        // Checked only when the round would take the report: a device the
        // engine refuses (not selected, round not open, a replay) costs no
        // signature check, and the runner refuses it.
        let core = runner.core();
        let wanted = task == runner.id() && core.engine().refusal(device, round).is_none();
        if let (Some(DeviceMessage::Advertise(ad)), Some(plan), true) =
            (&message, core.secure_plan(), wanted)
        {
            let checked = if ad.device != device || !ad.sizes_ok() {
                Err("an advertisement for another device, or oversized".to_string())
            } else {
                ad.verify(&plan.context.digest(), &self.authenticator)
            };
            if let Err(why) = checked {
                self.metrics.reject("advertisement");
                warn!(device, "secure aggregation: advertisement refused: {why}");
                return refuse(
                    ErrorCode::UpdateRejected,
                    format!("advertisement refused: {why}"),
                );
            }
        }
        self.with_runner(now, "secure aggregation", |runner, io| {
            runner.secure(io, device, task, round, message)
        })
    }

    /// Bytes of `device`'s masked input for `round` of `task`.
    pub fn secure_chunk(
        &mut self,
        device: u64,
        (task, round): (u64, u64),
        offset: u64,
        data: &[u8],
        now: u64,
    ) -> CoordinatorMessage {
        self.with_runner(now, "secure aggregation", |runner, io| {
            runner.secure_chunk(io, device, task, round, offset, data)
        })
    }
}
