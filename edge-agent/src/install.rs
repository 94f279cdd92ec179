//! `edge-agent install`: writes the agent's run configuration
//! ([`crate::config`]) and a systemd unit that keeps it running.
//!
//! The unit runs the agent as a dedicated, unprivileged user (`fleet-agent`
//! by default), sandboxed (no new privileges and no capabilities, a
//! read-only system, no home directories, private /tmp and devices, IP and
//! Unix sockets only, only the state directory writable), at low CPU and
//! I/O priority and under a memory cap. It starts only once the state
//! directory holds an enrolled device, restarts the agent after a failure,
//! but not after the agent stopped for good
//! ([`crate::run::STOPPED_FOR_GOOD`]: revoked, or a coordinator that
//! refuses its protocol), which a restart cannot mend.
//!
//! The Debian package ships the same unit, for the default configuration
//! at the package's paths ([`packaged_unit`]); a test keeps
//! `dist/deb/fleet-edge-agent.service` equal to it.

use std::path::{Path, PathBuf};

use crate::config::RunConfig;
use crate::run::STOPPED_FOR_GOOD;
use crate::state::{IDENTITY_FILE, StateDir};

/// The unit's file name.
pub const UNIT: &str = "fleet-edge-agent.service";

/// The user the service runs as unless told otherwise.
pub const DEFAULT_USER: &str = "fleet-agent";

/// Where the Debian package puts the agent's binary.
pub const PACKAGED_BINARY: &str = "/usr/bin/edge-agent";

/// The state directory of the packaged service.
pub const PACKAGED_STATE: &str = "/var/lib/fleet-edge-agent";

/// The memory cap for an agent that tells the coordinator it may use
/// `memory_mib` for training: that, plus the runtime.
pub fn memory_max_mib(config: &RunConfig) -> u32 {
    config.memory_mib + 128
}

/// Whether `path` lies where `ProtectHome=yes` would hide it.
fn in_home(path: &Path) -> bool {
    ["/home", "/root", "/run/user"]
        .iter()
        .any(|home| path.starts_with(home))
}

/// The systemd unit text for an agent binary at `binary` with state in
/// `state` and training data in `data` (absolute paths), run as `user` and
/// `group` (by default the user's own group), its memory capped at
/// `memory_max_mib`.
pub fn unit(
    binary: &Path,
    state: &Path,
    data: Option<&Path>,
    user: &str,
    group: Option<&str>,
    memory_max_mib: u32,
) -> String {
    let group = group.map_or(String::new(), |g| format!("Group={g}\n"));
    // systemd creates a state directory under /var/lib itself, owned by the
    // user, and keeps it writable.
    let state_directory = state
        .strip_prefix("/var/lib")
        .ok()
        .filter(|name| !name.as_os_str().is_empty())
        .map_or(String::new(), |name| {
            format!(
                "StateDirectory={}\nStateDirectoryMode=0700\n",
                name.display()
            )
        });
    // A binary, state or data in a home directory (`install` from a user's
    // build) needs home directories visible: read-only, then.
    let protect_home = if in_home(binary) || in_home(state) || data.is_some_and(in_home) {
        "read-only"
    } else {
        "yes"
    };
    let (binary, state) = (binary.display(), state.display());
    format!(
        "[Unit]
Description=Fleet learning edge agent
Wants=network-online.target
After=network-online.target
# Not before the device is enrolled (`edge-agent enroll`): nothing to run.
ConditionPathExists={state}/{IDENTITY_FILE}

[Service]
Type=simple
User={user}
{group}ExecStart={binary} run --state {state}
Restart=on-failure
RestartSec=5
# Revoked, or refused by the coordinator's protocol: restarting cannot help.
RestartPreventExitStatus={STOPPED_FOR_GOOD}
# The agent trains in the background: stay out of the owner's way.
Nice=10
IOSchedulingClass=idle
MemoryMax={memory_max_mib}M
# Sandbox: the agent reads its state, trains, and talks QUIC (UDP) to the
# coordinator and over a Unix socket to apps on the device.
{state_directory}ReadWritePaths={state}
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"
    )
}

/// The unit the Debian package ships: the agent at [`PACKAGED_BINARY`],
/// state in [`PACKAGED_STATE`], run as [`DEFAULT_USER`] and its group, with
/// the memory cap of the default configuration.
pub fn packaged_unit() -> String {
    unit(
        Path::new(PACKAGED_BINARY),
        Path::new(PACKAGED_STATE),
        None,
        DEFAULT_USER,
        Some(DEFAULT_USER),
        memory_max_mib(&RunConfig::default()),
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
    let text = unit(
        &binary,
        &state_dir,
        config.data.as_deref(),
        user,
        None,
        memory_max_mib(config),
    );
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
        // Started once enrolled; sandboxed; the user's own group.
        assert!(
            text.contains(&format!(
                "ConditionPathExists={}/agent.json",
                std::path::absolute(state.dir()).unwrap().display()
            )),
            "{text}"
        );
        for line in [
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=\n",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateDevices=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "MemoryDenyWriteExecute=yes",
            "UMask=0077",
        ] {
            assert!(text.contains(line), "{line:?} missing: {text}");
        }
        assert!(!text.contains("Group="), "{text}");
        // State outside /var/lib: systemd does not manage the directory.
        assert!(!text.contains("StateDirectory="), "{text}");
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

    #[test]
    fn the_unit_hides_home_directories_unless_the_agent_lives_there() {
        let text = unit(
            Path::new("/home/pi/.cargo/bin/edge-agent"),
            Path::new("/var/lib/fleet-agent"),
            None,
            "pi",
            None,
            384,
        );
        assert!(text.contains("ProtectHome=read-only"), "{text}");
        assert!(text.contains("StateDirectory=fleet-agent\n"), "{text}");
        let text = unit(
            Path::new("/usr/local/bin/edge-agent"),
            Path::new("/root/fleet-agent"),
            None,
            "root",
            None,
            384,
        );
        assert!(text.contains("ProtectHome=read-only"), "{text}");
        assert!(
            text.contains("ReadWritePaths=/root/fleet-agent\n"),
            "{text}"
        );
        let text = unit(
            Path::new("/usr/bin/edge-agent"),
            Path::new("/var/lib/fleet-agent"),
            Some(Path::new("/home/pi/fleet-data")),
            "pi",
            None,
            384,
        );
        assert!(text.contains("ProtectHome=read-only"), "{text}");
    }

    /// The Debian package's unit is this module's: regenerate it with
    /// `FLEET_WRITE_UNIT=1 cargo test -p fleet-edge-agent --lib install`.
    #[test]
    fn the_packaged_unit_is_the_installers() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/deb/fleet-edge-agent.service");
        let expected = packaged_unit();
        if std::env::var_os("FLEET_WRITE_UNIT").is_some() {
            std::fs::write(&path, &expected).unwrap();
        }
        let shipped =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            shipped,
            expected,
            "{} differs from install::packaged_unit(); regenerate it with FLEET_WRITE_UNIT=1",
            path.display()
        );
        for line in [
            "User=fleet-agent\nGroup=fleet-agent\n",
            "ExecStart=/usr/bin/edge-agent run --state /var/lib/fleet-edge-agent\n",
            "ConditionPathExists=/var/lib/fleet-edge-agent/agent.json\n",
            "StateDirectory=fleet-edge-agent\nStateDirectoryMode=0700\n",
            "ReadWritePaths=/var/lib/fleet-edge-agent\n",
            "ProtectHome=yes\n",
            "MemoryMax=384M\n",
        ] {
            assert!(shipped.contains(line), "{line:?} missing: {shipped}");
        }
    }
}
