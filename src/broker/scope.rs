//! Transient systemd scopes and slices, through systemd's D-Bus API.
//!
//! Each worker lives in `corral-<workflow>-<n>.scope` inside
//! `corral-<tenant>.slice` (itself inside `corral.slice`), with the
//! workflow's `MemoryMax`, `MemorySwapMax`, `CPUQuota`, `TasksMax` and
//! `IOWeight` — the same unit `systemd-run --scope -p …` would make. The
//! broker creates the scope around the worker's PID *before* it sends the
//! worker its Init message, and checks that the PID has arrived in the
//! scope's cgroup: the worker does no untrusted work outside it.

use std::time::{Duration, Instant};

use zbus::zvariant::{OwnedObjectPath, Value};

/// How long systemd may take to move a PID into a new scope.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    fn set_unit_properties(&self, name: &str, runtime: bool, properties: &[(&str, Value<'_>)]) -> zbus::Result<()>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(String, String, String, String, String, String, OwnedObjectPath, u32, String, OwnedObjectPath)>,
    >;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("failed to reach systemd over D-Bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("systemd refused to create {unit}: {source}")]
    Create { unit: String, source: zbus::Error },
    #[error("failed to stop {unit}: {source}")]
    Stop { unit: String, source: zbus::Error },
    #[error("failed to list units: {0}")]
    List(#[source] zbus::Error),
    #[error("worker {pid} did not arrive in {unit} within {JOIN_TIMEOUT:?}")]
    Join { unit: String, pid: u32 },
}

/// Resource limits of one unit, as systemd properties.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnitLimits {
    pub memory_max: Option<u64>,
    pub memory_swap_max: Option<u64>,
    /// Percent of one CPU (150 = one and a half).
    pub cpu_quota_percent: Option<u32>,
    pub tasks_max: Option<u64>,
    pub io_weight: Option<u64>,
}

impl UnitLimits {
    fn properties(&self) -> Vec<(&'static str, Value<'static>)> {
        let mut p: Vec<(&'static str, Value<'static>)> = vec![
            ("MemoryAccounting", Value::from(true)),
            ("TasksAccounting", Value::from(true)),
            ("CPUAccounting", Value::from(true)),
        ];
        if let Some(v) = self.memory_max {
            p.push(("MemoryMax", Value::from(v)));
        }
        if let Some(v) = self.memory_swap_max {
            p.push(("MemorySwapMax", Value::from(v)));
        }
        if let Some(v) = self.cpu_quota_percent {
            p.push(("CPUQuotaPerSecUSec", Value::from(u64::from(v) * 10_000)));
        }
        if let Some(v) = self.tasks_max {
            p.push(("TasksMax", Value::from(v)));
        }
        if let Some(v) = self.io_weight {
            p.push(("IOWeight", Value::from(v)));
        }
        p
    }

    /// The `-p` options of the equivalent `systemd-run --scope` line.
    pub fn systemd_run_options(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(v) = self.memory_max {
            o.push(format!("-p MemoryMax={v}"));
        }
        if let Some(v) = self.memory_swap_max {
            o.push(format!("-p MemorySwapMax={v}"));
        }
        if let Some(v) = self.cpu_quota_percent {
            o.push(format!("-p CPUQuota={v}%"));
        }
        if let Some(v) = self.tasks_max {
            o.push(format!("-p TasksMax={v}"));
        }
        if let Some(v) = self.io_weight {
            o.push(format!("-p IOWeight={v}"));
        }
        o
    }
}

/// Escapes a name for use inside a unit name the way `systemd-escape` does,
/// so that a `-` in a tenant name does not nest the slice one level deeper.
pub fn escape(name: &str) -> String {
    let mut out = String::new();
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `corral-<tenant>.slice`.
pub fn slice_name(tenant: &str) -> String {
    format!("corral-{}.slice", escape(tenant))
}

/// `<prefix>-<workflow>-<n>.scope`; the prefix is `corral`, or
/// `corral-<instance>` for a broker started with `--instance`.
pub fn scope_name(prefix: &str, workflow: &str, n: u64) -> String {
    format!("{prefix}-{workflow}-{n}.scope")
}

/// The scope-name prefix of a broker instance.
pub fn scope_prefix(instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("corral-{}", escape(i)),
        None => "corral".to_string(),
    }
}

/// The broker's handle on systemd.
#[derive(Clone)]
pub struct Systemd {
    manager: ManagerProxy<'static>,
    pub version: String,
}

impl Systemd {
    /// Connects to the system bus and to systemd on it.
    pub async fn connect() -> Result<Systemd, ScopeError> {
        let conn = zbus::Connection::system().await.map_err(ScopeError::Connect)?;
        let manager = ManagerProxy::new(&conn).await.map_err(ScopeError::Connect)?;
        let version = manager.version().await.map_err(ScopeError::Connect)?;
        Ok(Systemd { manager, version })
    }

    /// Creates (or updates) a tenant's slice with its limits.
    pub async fn ensure_slice(&self, name: &str, limits: &UnitLimits) -> Result<(), ScopeError> {
        let mut props = limits.properties();
        props.push(("Description", Value::from("corral tenant")));
        match self.manager.start_transient_unit(name, "fail", &props, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("already exists") || e.to_string().contains("UnitExists") => {
                let props = limits.properties();
                self.manager
                    .set_unit_properties(name, true, &props)
                    .await
                    .map_err(|source| ScopeError::Create { unit: name.to_string(), source })
            }
            Err(source) => Err(ScopeError::Create { unit: name.to_string(), source }),
        }
    }

    /// Puts `pid` into a new scope and waits until it is there.
    pub async fn create_scope(
        &self,
        unit: &str,
        slice: &str,
        pid: u32,
        description: &str,
        limits: &UnitLimits,
    ) -> Result<(), ScopeError> {
        let mut props = limits.properties();
        props.push(("PIDs", Value::from(vec![pid])));
        props.push(("Slice", Value::from(slice.to_string())));
        props.push(("Description", Value::from(description.to_string())));
        // Keep the worker when one of its tools is OOM-killed; a failed scope
        // is garbage-collected rather than left behind.
        props.push(("OOMPolicy", Value::from("continue")));
        props.push(("CollectMode", Value::from("inactive-or-failed")));
        props.push(("DefaultDependencies", Value::from(false)));
        // The service sees the host's /dev (PrivateDevices=no, for the
        // disk_max loop devices); its workers get only the pseudo devices.
        props.push(("DevicePolicy", Value::from("closed")));
        self.manager
            .start_transient_unit(unit, "fail", &props, &[])
            .await
            .map_err(|source| ScopeError::Create { unit: unit.to_string(), source })?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while Instant::now() < deadline {
            if in_unit(pid, unit) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(ScopeError::Join { unit: unit.to_string(), pid })
    }

    pub async fn stop(&self, unit: &str) -> Result<(), ScopeError> {
        self.manager
            .stop_unit(unit, "replace")
            .await
            .map(drop)
            .map_err(|source| ScopeError::Stop { unit: unit.to_string(), source })
    }

    /// Stops every `<prefix>-*.scope` that exists: on start they can only be
    /// left over from an earlier broker (crash, kill -9), and may still hold
    /// orphaned tool processes.
    pub async fn stop_stale_scopes(&self, prefix: &str) -> Result<Vec<String>, ScopeError> {
        let pattern = format!("{prefix}-*.scope");
        let units = self.manager.list_units_by_patterns(&[], &[pattern.as_str()]).await.map_err(ScopeError::List)?;
        let mut stopped = Vec::new();
        for u in units {
            self.stop(&u.0).await?;
            stopped.push(u.0);
        }
        Ok(stopped)
    }
}

/// Whether `pid` is in `unit` in every hierarchy that holds its limits.
pub fn in_unit(pid: u32, unit: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|t| crate::cgroup::placed_in(&t, unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_systemd_escape() {
        assert_eq!(escape("kid"), "kid");
        assert_eq!(escape("my-team"), "my\\x2dteam");
        assert_eq!(slice_name("my-team"), "corral-my\\x2dteam.slice");
        assert_eq!(scope_name("corral", "homework", 3), "corral-homework-3.scope");
        assert_eq!(scope_prefix(Some("t-1")), "corral-t\\x2d1");
    }

    #[test]
    fn systemd_run_line_names_every_limit() {
        let l = UnitLimits {
            memory_max: Some(256 << 20),
            memory_swap_max: Some(0),
            cpu_quota_percent: Some(50),
            tasks_max: Some(64),
            io_weight: None,
        };
        assert_eq!(
            l.systemd_run_options(),
            ["-p MemoryMax=268435456", "-p MemorySwapMax=0", "-p CPUQuota=50%", "-p TasksMax=64"]
        );
        let names: Vec<_> = l.properties().into_iter().map(|(k, _)| k).collect();
        assert!(names.contains(&"CPUQuotaPerSecUSec") && names.contains(&"MemoryMax"));
    }
}
