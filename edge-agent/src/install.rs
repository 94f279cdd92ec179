//! `edge-agent install`: writes the agent's run configuration
//! ([`crate::config`]) and a systemd unit that keeps it running.
//!
//! The unit runs the agent as a dedicated, unprivileged user (`fleet-agent`
//! by default), sandboxed (no new privileges, a read-only system and home,
//! only the state directory writable), at low CPU and I/O priority and
//! under a memory cap. It restarts the agent after a failure, but not after
//! the agent stopped for good ([`crate::run::STOPPED_FOR_GOOD`]: revoked,
//! or a coordinator that refuses its protocol), which a restart cannot
//! mend.

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::run::STOPPED_FOR_GOOD;
use crate::state::StateDir;

/// The unit's file name.
pub const UNIT: &str = "fleet-edge-agent.service";

/// The user the service runs as unless told otherwise.
pub const DEFAULT_USER: &str = "fleet-agent";

/// The systemd unit text for an agent binary at `binary` with state in
/// `state`, run as `user`.
pub fn unit(binary: &Path, state: &Path, user: &str, memory_max_mib: u32) -> String {
    format!(
        "[Unit]
Description=Fleet learning edge agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
ExecStart={binary} run --state {state}
Restart=on-failure
RestartSec=5
# Revoked, or refused by the coordinator's protocol: restarting cannot help.
RestartPreventExitStatus={STOPPED_FOR_GOOD}
# The agent trains in the background: stay out of the owner's way.
Nice=10
IOSchedulingClass=idle
MemoryMax={memory_max_mib}M
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ReadWritePaths={state}

[Install]
WantedBy=multi-user.target
",
        binary = binary.display(),
        state = state.display(),
    )
}

/// Whether `user` names an account on this system.
fn user_exists(user: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(user) else {
        return false;
    };
    // SAFETY: `name` is a valid C string for the call; the returned
    // pointer is only compared with null, never dereferenced.
    !unsafe { libc::getpwnam(name.as_ptr()) }.is_null()
}

/// Writes `config.json` into the state directory and the unit into
/// `unit_dir`; returns the unit's path. `user` must exist.
pub fn install(
    state: &StateDir,
    config: &RunConfig,
    binary: &Path,
    unit_dir: &Path,
    user: &str,
) -> Result<PathBuf, String> {
    if !user_exists(user) {
        return Err(format!(
            "no user {user:?} to run the agent as: create it with `useradd --system --shell \
             /usr/sbin/nologin {user}` and give it the state directory (`chown -R {user}: {}`), \
             or name another with --user",
            state.dir().display()
        ));
    }
    let json = serde_json::to_vec_pretty(config).expect("plain data serialises");
    state.write("config.json", &json)?;
    let state_dir = std::path::absolute(state.dir()).map_err(|e| e.to_string())?;
    let binary = std::path::absolute(binary).map_err(|e| e.to_string())?;
    // Training may use what the agent tells the coordinator, plus the runtime.
    let text = unit(&binary, &state_dir, user, config.memory_mib + 128);
    std::fs::create_dir_all(unit_dir).map_err(|e| format!("{}: {e}", unit_dir.display()))?;
    let path = unit_dir.join(UNIT);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load as config;

    #[test]
    fn install_writes_a_config_that_reads_back_and_a_unit() {
        let root = std::env::temp_dir().join(format!("fleet-install-{}", std::process::id()));
        let state = StateDir::at(root.join("state"));
        let cfg = RunConfig {
            data: Some("/var/lib/fleet/data".into()),
            upload_bytes_per_sec: Some(100_000),
            ..RunConfig::default()
        };
        let unit = install(
            &state,
            &cfg,
            Path::new("/usr/bin/edge-agent"),
            &root.join("units"),
            "root",
        )
        .unwrap();
        assert_eq!(config(&state).unwrap(), cfg);
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/edge-agent run --state /"));
        assert!(text.contains("User=root"));
        assert!(text.contains("MemoryMax=384M"));
        // Restarted after a failure, not after being revoked.
        assert!(text.contains("Restart=on-failure"), "{text}");
        assert!(
            text.contains(&format!("RestartPreventExitStatus={STOPPED_FOR_GOOD}")),
            "{text}"
        );
        // A user that does not exist is refused, saying how to create it.
        let err = install(
            &state,
            &cfg,
            Path::new("/usr/bin/edge-agent"),
            &root.join("units"),
            "no-such-fleet-user",
        )
        .unwrap_err();
        assert!(err.contains("useradd --system"), "{err}");
        std::fs::write(state.dir().join("config.json"), "{\"dat\": 1}").unwrap();
        let err = config(&state).unwrap_err();
        assert!(err.contains("unknown field `dat`"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
