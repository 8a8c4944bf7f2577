//! The policy file as written: serde structs with `deny_unknown_fields`.
//! Every key is optional here so that `validate` can report all missing and
//! invalid keys at once, each with its line; scalars with a grammar (sizes,
//! durations, percentages, paths, names) stay strings until then.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub workflow: Option<RawWorkflow>,
    pub sandbox: Option<RawSandbox>,
    pub limits: Option<RawLimits>,
    pub tenant: Option<RawTenant>,
    pub pool: Option<RawPool>,
    pub env: Option<BTreeMap<String, String>>,
    pub llm: Option<RawLlm>,
    pub network: Option<RawNetwork>,
    pub sessions: Option<RawSessions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSessions {
    pub idle: Option<String>,
    pub max: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkflow {
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub user: Option<String>,
    pub clients: Option<RawClients>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClients {
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSandbox {
    pub landlock: Option<String>,
    pub read: Option<Vec<String>>,
    pub write: Option<Vec<String>>,
    pub exec: Option<Vec<String>>,
    pub tcp_connect: Option<Vec<i64>>,
    pub tcp_bind: Option<Vec<i64>>,
    pub seccomp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory_max: Option<SizeText>,
    pub memory_swap_max: Option<SizeText>,
    pub cpu_quota: Option<String>,
    pub tasks_max: Option<i64>,
    pub io_weight: Option<i64>,
    pub call_timeout: Option<String>,
    pub output_max: Option<SizeText>,
    pub stdin_max: Option<SizeText>,
    pub file_size_max: Option<SizeText>,
    pub open_files_max: Option<i64>,
    pub disk_max: Option<SizeText>,
    pub receipts: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    pub memory_max: Option<SizeText>,
    pub cpu_quota: Option<String>,
    pub tasks_max: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub min_idle: Option<i64>,
    pub max_workers: Option<i64>,
    pub queue: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLlm {
    pub base_url: Option<String>,
    pub model: Option<String>,
    pub credential: Option<String>,
    pub endpoint_user: Option<String>,
    pub endpoint_socket: Option<String>,
    pub max_steps: Option<i64>,
    pub daily_tokens: Option<i64>,
    pub tenant_daily_tokens: Option<i64>,
    pub timeout: Option<String>,
    pub spike_factor: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub allow: Option<Vec<String>>,
    pub private: Option<bool>,
    pub connections_max: Option<i64>,
    pub bytes_max: Option<SizeText>,
}

/// A size as written: a string (`"256M"`) or an integer number of bytes,
/// kept as text for `ByteSize::from_str`.
#[derive(Debug)]
pub(crate) struct SizeText(pub String);

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SizeText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256M\" or an integer number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The tables whose keys are fixed, by dotted path (`""` is the top level),
/// with the field names serde itself accepts there, so the list printed in
/// "unknown key" messages can never drift from the structs above.
pub(crate) fn known_keys(table: &str) -> Option<&'static [&'static str]> {
    match table {
        "" => fields_of::<RawFile>(),
        "workflow" => fields_of::<RawWorkflow>(),
        "workflow.clients" => fields_of::<RawClients>(),
        "sandbox" => fields_of::<RawSandbox>(),
        "limits" => fields_of::<RawLimits>(),
        "tenant" => fields_of::<RawTenant>(),
        "pool" => fields_of::<RawPool>(),
        "llm" => fields_of::<RawLlm>(),
        "network" => fields_of::<RawNetwork>(),
        "sessions" => fields_of::<RawSessions>(),
        _ => None,
    }
}

/// The field names a derived `Deserialize` struct passes to
/// `deserialize_struct`.
fn fields_of<'de, T: Deserialize<'de>>() -> Option<&'static [&'static str]> {
    let mut probe = FieldsProbe(None);
    // The probe always fails once it has seen the field list.
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct FieldsProbe(Option<&'static [&'static str]>);

#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<T: fmt::Display>(_: T) -> Self {
        ProbeDone
    }
}

impl<'de> Deserializer<'de> for &mut FieldsProbe {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        self.0 = Some(fields);
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_match_the_structs() {
        assert_eq!(
            known_keys(""),
            Some(&["workflow", "sandbox", "limits", "tenant", "pool", "env", "llm", "network", "sessions"][..])
        );
        assert_eq!(
            known_keys("sandbox"),
            Some(&["landlock", "read", "write", "exec", "tcp_connect", "tcp_bind", "seccomp"][..])
        );
        assert_eq!(known_keys("workflow.clients"), Some(&["users", "groups"][..]));
        assert_eq!(known_keys("tenant"), Some(&["memory_max", "cpu_quota", "tasks_max"][..]));
        assert_eq!(known_keys("env"), None);
    }
}
