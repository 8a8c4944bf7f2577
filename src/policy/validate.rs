//! From [`RawFile`] to [`Workflow`]: defaults, grammars and ranges. Collects
//! every problem of the file, each with its line and key.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::document::Lines;
use super::error::{Place, PolicyError};
use super::names::check_unix_name;
use super::network::{AllowRule, Network, DEFAULT_BYTES_MAX, DEFAULT_CONNECTIONS_MAX};
use super::path::PathTemplate;
use super::raw::{
    RawClients, RawFile, RawLimits, RawLlm, RawNetwork, RawPool, RawSandbox, RawSessions, RawTenant, SizeText,
};
use super::schema::{
    Clients, Limits, Llm, PoolConfig, Requirement, Sandbox, SeccompProfile, Sessions, TenantLimits, Workflow,
    DEFAULT_EXEC, DEFAULT_LLM_TIMEOUT, DEFAULT_SESSIONS_MAX, DEFAULT_SESSION_IDLE, DEFAULT_SPIKE_FACTOR, DEFAULT_WRITE,
    MIN_DISK_MAX,
};
use super::units::{format_duration, parse_duration, ByteSize, Percent};

const MIN_CALL_TIMEOUT: Duration = Duration::from_millis(10);
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_STREAM: ByteSize = ByteSize::mib(4);
const MIN_LLM_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_LLM_TIMEOUT: Duration = Duration::from_secs(600);

/// Collects errors for one file.
struct Check<'a> {
    file: &'a Path,
    lines: &'a Lines,
    errors: Vec<PolicyError>,
}

impl Check<'_> {
    fn at(&self, key: &str) -> Place {
        Place { file: self.file.to_path_buf(), line: self.lines.of(key), key: Some(key.to_owned()) }
    }

    fn invalid(&mut self, key: &str, message: impl Display) {
        let at = self.at(key);
        self.errors.push(PolicyError::Invalid { at, message: message.to_string() });
    }

    fn missing(&mut self, key: &str, example: &'static str) {
        let at = self.at(key);
        self.errors.push(PolicyError::MissingKey { at, example });
    }

    /// Parses `text` with `FromStr`, reporting the parse error at `key`.
    fn parse<T: FromStr>(&mut self, key: &str, text: &str) -> Option<T>
    where
        T::Err: Display,
    {
        match text.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.invalid(key, e);
                None
            }
        }
    }

    /// An integer in `range`, or `default` when absent.
    fn int<T: TryFrom<i64> + Copy>(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: T,
        range: RangeInclusive<i64>,
    ) -> T {
        self.opt_int(key, value, range).unwrap_or(default)
    }

    fn opt_int<T: TryFrom<i64>>(&mut self, key: &str, value: Option<i64>, range: RangeInclusive<i64>) -> Option<T> {
        let v = value?;
        match T::try_from(v) {
            Ok(t) if range.contains(&v) => Some(t),
            _ => {
                let (lo, hi) = (range.start(), range.end());
                self.invalid(key, format!("{v} is out of range: expected an integer from {lo} to {hi}"));
                None
            }
        }
    }

    /// A size between `min` and `max`, or `default` when absent.
    fn size(
        &mut self,
        key: &str,
        value: Option<&SizeText>,
        default: ByteSize,
        min: ByteSize,
        max: Option<ByteSize>,
    ) -> ByteSize {
        self.opt_size(key, value, min, max).unwrap_or(default)
    }

    fn opt_size(
        &mut self,
        key: &str,
        value: Option<&SizeText>,
        min: ByteSize,
        max: Option<ByteSize>,
    ) -> Option<ByteSize> {
        let text = &value?.0;
        let size: ByteSize = self.parse(key, text)?;
        if size < min {
            self.invalid(key, format!("size {text:?} is too small: expected at least \"{min}\""));
            return None;
        }
        if let Some(max) = max.filter(|max| size > *max) {
            self.invalid(key, format!("size {text:?} is too large: expected at most \"{max}\""));
            return None;
        }
        Some(size)
    }

    fn paths(&mut self, key: &str, value: Option<&Vec<String>>, default: &[&str]) -> Vec<PathTemplate> {
        let Some(items) = value else {
            return default.iter().filter_map(|p| p.parse().ok()).collect();
        };
        items.iter().enumerate().filter_map(|(i, p)| self.parse(&format!("{key}[{i}]"), p)).collect()
    }

    fn ports(&mut self, key: &str, value: Option<&Vec<i64>>) -> Vec<u16> {
        let items = value.map(Vec::as_slice).unwrap_or_default();
        items
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match u16::try_from(*p) {
                Ok(port) if port != 0 => Some(port),
                _ => {
                    self.invalid(
                        &format!("{key}[{i}]"),
                        format!("invalid port {p}: expected a TCP port from 1 to 65535"),
                    );
                    None
                }
            })
            .collect()
    }

    fn unix_names(&mut self, key: &str, value: Option<&Vec<String>>) -> Vec<String> {
        let items = value.map(Vec::as_slice).unwrap_or_default();
        for (i, name) in items.iter().enumerate() {
            if let Err(message) = check_unix_name(name) {
                self.invalid(&format!("{key}[{i}]"), message);
            }
        }
        items.to_vec()
    }
}

/// Validates a deserialized file. `Err` holds every problem found, in file
/// order.
pub(crate) fn validate(file: &Path, lines: &Lines, raw: RawFile) -> Result<Workflow, Vec<PolicyError>> {
    let mut c = Check { file, lines, errors: Vec::new() };
    let Some(wf) = raw.workflow else {
        return Err(vec![PolicyError::MissingTable {
            file: file.to_path_buf(),
            table: "workflow",
            example: "[workflow] with name = \"homework\" and tenant = \"kid\"",
        }]);
    };
    let name = match &wf.name {
        Some(n) => c.parse("workflow.name", n),
        None => {
            c.missing("workflow.name", "name = \"homework\"");
            None
        }
    };
    let tenant = match &wf.tenant {
        Some(t) => c.parse("workflow.tenant", t),
        None => {
            c.missing("workflow.tenant", "tenant = \"kid\"");
            None
        }
    };
    if let Some(user) = &wf.user {
        if let Err(message) = check_unix_name(user) {
            c.invalid("workflow.user", message);
        }
    }
    let clients = clients(&mut c, wf.clients.unwrap_or_default());
    let sandbox = sandbox(&mut c, raw.sandbox.unwrap_or_default());
    let limits = limits(&mut c, raw.limits.unwrap_or_default());
    let tenant_limits = tenant_limits(&mut c, raw.tenant.unwrap_or_default());
    let pool = pool(&mut c, raw.pool.unwrap_or_default());
    let env = env(&mut c, raw.env.unwrap_or_default());
    let llm = raw.llm.and_then(|l| llm(&mut c, l));
    let network = raw.network.map(|n| network(&mut c, n));
    let sessions = sessions(&mut c, raw.sessions.unwrap_or_default());
    if network.is_some() && !sandbox.tcp_connect.is_empty() {
        c.invalid(
            "sandbox.tcp_connect",
            "a workflow with [network] reaches the network only through the broker's proxy: remove \
             sandbox.tcp_connect and name the hosts in [network].allow instead",
        );
    }
    match (name, tenant) {
        (Some(name), Some(tenant)) if c.errors.is_empty() => Ok(Workflow {
            name,
            tenant,
            user: wf.user,
            clients,
            sandbox,
            limits,
            tenant_limits,
            pool,
            env,
            llm,
            network,
            sessions,
            source: file.to_path_buf(),
        }),
        _ => {
            // File order; errors without a line last.
            let mut errors = c.errors;
            errors.sort_by_key(|e| e.place().and_then(|p| p.line).unwrap_or(usize::MAX));
            Err(errors)
        }
    }
}

fn sessions(c: &mut Check<'_>, raw: RawSessions) -> Sessions {
    let idle = match &raw.idle {
        None => DEFAULT_SESSION_IDLE,
        Some(text) => match c.parse_with("sessions.idle", text, parse_duration) {
            Some(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(365 * 24 * 3600) => d,
            Some(_) => {
                c.invalid("sessions.idle", format!("{text:?} is out of range: expected from \"1s\" to \"365d\""));
                DEFAULT_SESSION_IDLE
            }
            None => DEFAULT_SESSION_IDLE,
        },
    };
    Sessions { idle, max: c.int("sessions.max", raw.max, DEFAULT_SESSIONS_MAX, 1..=1024) }
}

fn clients(c: &mut Check<'_>, raw: RawClients) -> Clients {
    Clients {
        users: c.unix_names("workflow.clients.users", raw.users.as_ref()),
        groups: c.unix_names("workflow.clients.groups", raw.groups.as_ref()),
    }
}

fn sandbox(c: &mut Check<'_>, raw: RawSandbox) -> Sandbox {
    let landlock = match raw.landlock.as_deref() {
        None | Some("required") => Requirement::Required,
        Some("best-effort") => Requirement::BestEffort,
        Some(other) => {
            c.invalid("sandbox.landlock", format!("invalid value {other:?}: expected \"required\" or \"best-effort\""));
            Requirement::Required
        }
    };
    let seccomp = match raw.seccomp.as_deref() {
        None | Some("default") => SeccompProfile::Default,
        Some(other) => {
            c.invalid("sandbox.seccomp", format!("invalid profile {other:?}: the only profile is \"default\""));
            SeccompProfile::Default
        }
    };
    Sandbox {
        landlock,
        read: c.paths("sandbox.read", raw.read.as_ref(), &[]),
        write: c.paths("sandbox.write", raw.write.as_ref(), &DEFAULT_WRITE),
        exec: c.paths("sandbox.exec", raw.exec.as_ref(), &DEFAULT_EXEC),
        tcp_connect: c.ports("sandbox.tcp_connect", raw.tcp_connect.as_ref()),
        tcp_bind: c.ports("sandbox.tcp_bind", raw.tcp_bind.as_ref()),
        seccomp,
    }
}

fn limits(c: &mut Check<'_>, raw: RawLimits) -> Limits {
    let cpu_quota = c.cpu_quota("limits.cpu_quota", raw.cpu_quota.as_deref());
    let call_timeout = match &raw.call_timeout {
        None => Duration::from_secs(30),
        Some(text) => match c.parse_with("limits.call_timeout", text, parse_duration) {
            Some(d) if (MIN_CALL_TIMEOUT..=MAX_CALL_TIMEOUT).contains(&d) => d,
            Some(_) => {
                c.invalid(
                    "limits.call_timeout",
                    format!(
                        "duration {text:?} is out of range: expected from {} to {}",
                        format_duration(MIN_CALL_TIMEOUT),
                        format_duration(MAX_CALL_TIMEOUT)
                    ),
                );
                Duration::from_secs(30)
            }
            None => Duration::from_secs(30),
        },
    };
    Limits {
        memory_max: c.size("limits.memory_max", raw.memory_max.as_ref(), ByteSize::mib(256), ByteSize::mib(1), None),
        memory_swap_max: c.opt_size("limits.memory_swap_max", raw.memory_swap_max.as_ref(), ByteSize(0), None),
        cpu_quota,
        tasks_max: c.int("limits.tasks_max", raw.tasks_max, 64, 2..=4_194_304),
        io_weight: c.opt_int("limits.io_weight", raw.io_weight, 1..=10_000),
        call_timeout,
        output_max: c.size(
            "limits.output_max",
            raw.output_max.as_ref(),
            ByteSize::mib(1),
            ByteSize(1),
            Some(MAX_STREAM),
        ),
        stdin_max: c.size("limits.stdin_max", raw.stdin_max.as_ref(), ByteSize::mib(1), ByteSize(0), Some(MAX_STREAM)),
        file_size_max: c.size("limits.file_size_max", raw.file_size_max.as_ref(), ByteSize::mib(64), ByteSize(1), None),
        open_files_max: c.int("limits.open_files_max", raw.open_files_max, 256, 16..=65_536),
        disk_max: c.opt_size("limits.disk_max", raw.disk_max.as_ref(), MIN_DISK_MAX, None),
        receipts: raw.receipts.unwrap_or(true),
    }
}

/// `[tenant]`: every key optional, no defaults.
fn tenant_limits(c: &mut Check<'_>, raw: RawTenant) -> TenantLimits {
    TenantLimits {
        memory_max: c.opt_size("tenant.memory_max", raw.memory_max.as_ref(), ByteSize::mib(1), None),
        cpu_quota: c.cpu_quota("tenant.cpu_quota", raw.cpu_quota.as_deref()),
        tasks_max: c.opt_int("tenant.tasks_max", raw.tasks_max, 2..=4_194_304),
    }
}

impl Check<'_> {
    /// A `CPUQuota` percentage, more than 0%.
    fn cpu_quota(&mut self, key: &str, text: Option<&str>) -> Option<Percent> {
        let text = text?;
        let p: Percent = self.parse(key, text)?;
        if p.0 == 0 {
            self.invalid(
                key,
                "0% would stop the workers: expected more than 0%, e.g. \"50%\"; omit the key for no limit",
            );
            return None;
        }
        Some(p)
    }

    fn parse_with<T, E: Display>(&mut self, key: &str, text: &str, f: impl FnOnce(&str) -> Result<T, E>) -> Option<T> {
        match f(text) {
            Ok(v) => Some(v),
            Err(e) => {
                self.invalid(key, e);
                None
            }
        }
    }
}

fn pool(c: &mut Check<'_>, raw: RawPool) -> PoolConfig {
    let min_idle = c.int("pool.min_idle", raw.min_idle, 1, 0..=64);
    let max_workers = c.int("pool.max_workers", raw.max_workers, 2, 1..=64);
    let queue = c.int("pool.queue", raw.queue, 32, 1..=10_000);
    if min_idle > max_workers {
        let key = if c.lines.has("pool.min_idle") { "pool.min_idle" } else { "pool.max_workers" };
        c.invalid(
            key,
            format!(
                "min_idle ({min_idle}) is larger than max_workers ({max_workers}): \
                 expected min_idle <= max_workers; lower min_idle or raise max_workers"
            ),
        );
    }
    PoolConfig { min_idle, max_workers, queue }
}

fn env(c: &mut Check<'_>, raw: BTreeMap<String, String>) -> BTreeMap<String, String> {
    for (name, value) in &raw {
        let key = format!("env.{name}");
        let valid_name = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            c.invalid(
                &key,
                format!(
                    "invalid variable name {name:?}: use letters, digits and '_', \
                     starting with a letter or '_', e.g. LANG"
                ),
            );
        }
        if value.contains('\0') {
            c.invalid(&key, "the value contains a NUL byte, which no environment can hold");
        }
    }
    raw
}

fn llm(c: &mut Check<'_>, raw: RawLlm) -> Option<Llm> {
    if let Some(user) = &raw.endpoint_user {
        let ok = !user.is_empty()
            && !user.starts_with('-')
            && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            c.invalid("llm.endpoint_user", format!("invalid user name {user:?}: expected e.g. \"ollama\""));
        }
    }
    let (base_url, endpoint) = match raw.base_url {
        Some(url) => {
            match super::endpoint::classify(&url, raw.endpoint_user.as_deref(), raw.endpoint_socket.as_deref()) {
                Ok(endpoint) => (Some(url), Some(endpoint)),
                Err(message) => {
                    let key =
                        if message.starts_with("endpoint_socket") { "llm.endpoint_socket" } else { "llm.base_url" };
                    c.invalid(key, message);
                    (None, None)
                }
            }
        }
        None => {
            c.missing("llm.base_url", "base_url = \"http://127.0.0.1:11434/v1\"");
            (None, None)
        }
    };
    let model = match raw.model {
        Some(m) if !m.trim().is_empty() => Some(m),
        Some(_) => {
            c.invalid("llm.model", "empty model name: expected e.g. \"qwen2.5:3b\"");
            None
        }
        None => {
            c.missing("llm.model", "model = \"qwen2.5:3b\"");
            None
        }
    };
    if let Some(cred) = &raw.credential {
        let ok = !cred.is_empty()
            && cred != "."
            && cred != ".."
            && cred.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok {
            c.invalid(
                "llm.credential",
                format!(
                    "invalid credential name {cred:?}: expected a file name under \
                     $CREDENTIALS_DIRECTORY or an environment variable name, made of \
                     letters, digits, '_', '.' and '-', e.g. \"ollama\""
                ),
            );
        }
    }
    let max_steps = c.int("llm.max_steps", raw.max_steps, 8, 1..=64);
    let daily_tokens = c.opt_int("llm.daily_tokens", raw.daily_tokens, 1..=i64::MAX);
    let tenant_daily_tokens = c.opt_int("llm.tenant_daily_tokens", raw.tenant_daily_tokens, 1..=i64::MAX);
    let timeout = match &raw.timeout {
        None => DEFAULT_LLM_TIMEOUT,
        Some(text) => match c.parse_with("llm.timeout", text, parse_duration) {
            Some(d) if (MIN_LLM_TIMEOUT..=MAX_LLM_TIMEOUT).contains(&d) => d,
            Some(_) => {
                c.invalid(
                    "llm.timeout",
                    format!(
                        "duration {text:?} is out of range: expected from {} to {}",
                        format_duration(MIN_LLM_TIMEOUT),
                        format_duration(MAX_LLM_TIMEOUT)
                    ),
                );
                DEFAULT_LLM_TIMEOUT
            }
            None => DEFAULT_LLM_TIMEOUT,
        },
    };
    let spike_factor = match raw.spike_factor {
        None => DEFAULT_SPIKE_FACTOR,
        Some(f) if f.is_finite() && f > 1.0 => f,
        Some(f) => {
            c.invalid(
                "llm.spike_factor",
                format!(
                    "{f} is out of range: expected a number above 1, e.g. 5.0 \
                     (warn when an hour uses 5 times the trailing hourly average)"
                ),
            );
            DEFAULT_SPIKE_FACTOR
        }
    };
    Some(Llm {
        base_url: base_url?,
        endpoint: endpoint?,
        model: model?,
        credential: raw.credential,
        max_steps,
        daily_tokens,
        tenant_daily_tokens,
        timeout,
        spike_factor,
    })
}

fn network(c: &mut Check<'_>, raw: RawNetwork) -> Network {
    let allow = raw
        .allow
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| c.parse::<AllowRule>(&format!("network.allow[{i}]"), entry))
        .collect();
    Network {
        allow,
        private: raw.private.unwrap_or(false),
        connections_max: c.int("network.connections_max", raw.connections_max, DEFAULT_CONNECTIONS_MAX, 1..=100_000),
        bytes_max: c.size("network.bytes_max", raw.bytes_max.as_ref(), DEFAULT_BYTES_MAX, ByteSize::kib(1), None),
    }
}
