//! `edge-agent install`: writes the agent's run configuration
//! ([`crate::config`]) and a systemd unit that keeps it running.

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::state::StateDir;

/// The unit's file name.
pub const UNIT: &str = "fleet-edge-agent.service";

/// The systemd unit text for an agent binary at `binary` with state in `state`.
pub fn unit(binary: &Path, state: &Path, user: Option<&str>, memory_max_mib: u32) -> String {
    let user = user.map_or(String::new(), |u| format!("User={u}\n"));
    format!(
        "[Unit]
Description=Fleet learning edge agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
{user}ExecStart={binary} run --state {state}
Restart=always
RestartSec=5
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

/// Writes `config.json` into the state directory and the unit into `unit_dir`;
/// returns the unit's path.
pub fn install(
    state: &StateDir,
    config: &RunConfig,
    binary: &Path,
    unit_dir: &Path,
    user: Option<&str>,
) -> Result<PathBuf, String> {
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
            Some("fleet"),
        )
        .unwrap();
        assert_eq!(config(&state).unwrap(), cfg);
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/edge-agent run --state /"));
        assert!(text.contains("User=fleet"));
        assert!(text.contains("MemoryMax=384M"));
        std::fs::write(state.dir().join("config.json"), "{\"dat\": 1}").unwrap();
        let err = config(&state).unwrap_err();
        assert!(err.contains("unknown field `dat`"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
