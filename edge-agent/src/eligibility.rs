//! Eligibility rules: whether the device may train now.
//!
//! Federated training should not drain a phone's battery, slow down its
//! owner or spend their data plan (Bonawitz et al., 2019, train only when
//! charging, idle and on an unmetered network). Each rule can be turned off;
//! each reads what Linux exposes:
//!
//! - on AC power: some `/sys/class/power_supply/*` of type `Mains` or `USB`
//!   reports `online = 1`; a machine without power-supply entries (a server,
//!   most single-board computers) is on mains;
//! - idle: the one-minute load average from `/proc/loadavg` per CPU is below
//!   a bound;
//! - unmetered: Linux has no general interface for this (NetworkManager
//!   keeps it behind D-Bus), so it is a setting of the agent's configuration.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The rules, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rules {
    /// Train only on AC power.
    pub require_ac_power: bool,
    /// Train only when the load per CPU is below `max_load_per_cpu`.
    pub require_idle: bool,
    /// The idle bound on the one-minute load average per CPU.
    pub max_load_per_cpu: f64,
    /// Train only on an unmetered network.
    pub require_unmetered: bool,
    /// Whether the device's network is metered (set by whoever installs it).
    pub metered: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            require_ac_power: true,
            require_idle: false,
            max_load_per_cpu: 0.5,
            require_unmetered: true,
            metered: false,
        }
    }
}

/// Whether any mains supply is online under `root` (normally `/sys/class/power_supply`).
pub fn on_ac_power(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root) else {
        return true;
    };
    let mut supplies = 0;
    let mut mains = false;
    for e in entries.flatten() {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
        supplies += 1;
        let kind = read("type");
        if matches!(kind.trim(), "Mains" | "USB") && read("online").trim() == "1" {
            mains = true;
        }
    }
    supplies == 0 || mains
}

/// The one-minute load average per CPU, from `loadavg` text.
pub fn load_per_cpu(loadavg: &str, cpus: usize) -> Option<f64> {
    let one: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    Some(one / cpus.max(1) as f64)
}

impl Rules {
    /// Checks the rules on this system; `Err` names the first that fails.
    pub fn check(&self) -> Result<(), String> {
        if self.require_ac_power && !on_ac_power(Path::new("/sys/class/power_supply")) {
            return Err("not on AC power".into());
        }
        if self.require_idle {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let load = std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|t| load_per_cpu(&t, cpus));
            if let Some(l) = load
                && l >= self.max_load_per_cpu
            {
                return Err(format!(
                    "busy: load {l:.2} per CPU, at least {}",
                    self.max_load_per_cpu
                ));
            }
        }
        if self.require_unmetered && self.metered {
            return Err("on a metered network".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, kind: &str, online: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("type"), kind).unwrap();
        std::fs::write(d.join("online"), online).unwrap();
    }

    #[test]
    fn ac_power_is_read_from_power_supply_entries() {
        let root = std::env::temp_dir().join(format!("fleet-ps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert!(on_ac_power(&root), "no entries: a mains-powered machine");
        supply(&root, "BAT0", "Battery", "0");
        supply(&root, "AC", "Mains", "0\n");
        assert!(!on_ac_power(&root), "on battery");
        supply(&root, "AC", "Mains", "1\n");
        assert!(on_ac_power(&root));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn load_and_metered_rules() {
        assert_eq!(load_per_cpu("3.00 1.00 0.50 1/200 999", 4), Some(0.75));
        assert_eq!(load_per_cpu("garbage", 4), None);
        let metered = Rules {
            require_ac_power: false,
            metered: true,
            ..Rules::default()
        };
        assert_eq!(metered.check(), Err("on a metered network".to_string()));
        let relaxed = Rules {
            require_unmetered: false,
            ..metered
        };
        assert_eq!(relaxed.check(), Ok(()));
    }
}
