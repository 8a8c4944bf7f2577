//! The spanned view of a policy file: TOML syntax errors with their line, the
//! line of every key, unknown keys, and the key a serde error points at.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{Place, PolicyError};
use super::raw::known_keys;

/// Line numbers of every key and array element of one file, by dotted path
/// (`limits.memory_max`, `sandbox.read[2]`, `workflow` for a table header).
#[derive(Debug, Default)]
pub(crate) struct Lines(HashMap<String, usize>);

impl Lines {
    /// The line of `key`, or of its nearest enclosing key that has one.
    pub fn of(&self, key: &str) -> Option<usize> {
        let mut key = key;
        loop {
            if let Some(&line) = self.0.get(key) {
                return Some(line);
            }
            let cut = key.rfind(['.', '['])?;
            key = &key[..cut];
        }
    }

    /// Whether `key` is written in the file.
    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

/// A parsed file: its text and spanned tree.
pub(crate) struct Document<'a> {
    file: &'a Path,
    text: &'a str,
    root: DeTable<'a>,
}

impl<'a> Document<'a> {
    /// Parses the TOML syntax only.
    pub fn parse(file: &'a Path, text: &'a str) -> Result<Self, PolicyError> {
        match DeTable::parse(text) {
            Ok(root) => Ok(Self { file, text, root: root.into_inner() }),
            Err(e) => Err(PolicyError::Syntax {
                at: Place { file: file.to_path_buf(), line: e.span().map(|s| line_of(text, s.start)), key: None },
                message: syntax_message(text, &e),
            }),
        }
    }

    /// The line of every key.
    pub fn lines(&self) -> Lines {
        let mut lines = Lines::default();
        index_table(self.text, &self.root, "", &mut lines.0);
        lines
    }

    /// Every key that the schema does not know, in file order.
    pub fn unknown_keys(&self) -> Vec<PolicyError> {
        let mut found = Vec::new();
        self.check_table(&self.root, "", &mut found);
        found.sort_by_key(|(start, _)| *start);
        found.into_iter().map(|(_, e)| e).collect()
    }

    fn check_table(&self, table: &DeTable<'_>, path: &str, found: &mut Vec<(usize, PolicyError)>) {
        let Some(valid) = known_keys(path) else {
            return;
        };
        for (key, value) in table {
            let name = key.get_ref().as_ref();
            let child = join(path, name);
            if !valid.contains(&name) {
                let e = PolicyError::UnknownKey {
                    at: self.place(key.span().start, &child),
                    valid: valid.join(", "),
                    hint: suggest(name, path),
                };
                found.push((key.span().start, e));
            } else if let DeValue::Table(t) = value.get_ref() {
                self.check_table(t, &child, found);
            }
        }
    }

    /// Turns a serde error from deserializing this document into a located
    /// error naming the key its span points at.
    pub fn serde_error(&self, e: &toml::de::Error) -> PolicyError {
        let Some(span) = e.span() else {
            return PolicyError::Invalid {
                at: Place { file: self.file.to_path_buf(), line: None, key: None },
                message: e.message().to_owned(),
            };
        };
        let mut path = Vec::new();
        locate_table(&self.root, &span, &mut path);
        let mut key = render_path(&path);
        let mut message = with_expected(e.message(), &key);
        // `[[sandbox]]` makes an array of tables; serde then complains about
        // an element, which would only confuse.
        if let Some((table, _)) = key.split_once('[') {
            if expected_for(table) == Some("a table") {
                message = format!("invalid type: array of tables, expected a table: write [{table}], not [[{table}]]");
                key = table.to_owned();
            }
        }
        PolicyError::Invalid {
            at: Place {
                file: self.file.to_path_buf(),
                line: Some(line_of(self.text, span.start)),
                key: (!key.is_empty()).then_some(key),
            },
            message,
        }
    }

    fn place(&self, offset: usize, key: &str) -> Place {
        Place { file: self.file.to_path_buf(), line: Some(line_of(self.text, offset)), key: Some(key.to_owned()) }
    }
}

/// toml's message, plus the text it points at when that is short (for
/// `duplicate key`, the key).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let snippet = e
        .span()
        .and_then(|s| text.get(s))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 40 && !s.contains('\n'));
    match snippet {
        Some(s) => format!("{message} (at `{s}`)"),
        None => message.to_owned(),
    }
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn index_table(text: &str, table: &DeTable<'_>, path: &str, out: &mut HashMap<String, usize>) {
    for (key, value) in table {
        let child = join(path, key.get_ref());
        out.insert(child.clone(), line_of(text, key.span().start));
        index_value(text, value, &child, out);
    }
}

fn index_value(text: &str, value: &Spanned<DeValue<'_>>, path: &str, out: &mut HashMap<String, usize>) {
    match value.get_ref() {
        DeValue::Table(t) => index_table(text, t, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let child = format!("{path}[{i}]");
                out.insert(child.clone(), line_of(text, item.span().start));
                index_value(text, item, &child, out);
            }
        }
        _ => {}
    }
}

/// Pushes onto `path` the keys leading to the deepest entry whose key or
/// value contains `span.start`.
fn locate_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<String>) -> bool {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        if locate_value(value, span, path) || key.span().contains(&span.start) || value.span().contains(&span.start) {
            return true;
        }
        path.pop();
    }
    false
}

fn locate_value(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut Vec<String>) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => locate_table(t, span, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(format!("[{i}]"));
                if locate_value(item, span, path) || item.span().contains(&span.start) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !out.is_empty() && !part.starts_with('[') {
            out.push('.');
        }
        out.push_str(part);
    }
    out
}

/// Replaces serde's `expected u32`-style tail with what the key accepts.
fn with_expected(message: &str, key: &str) -> String {
    let Some(expected) = expected_for(key) else {
        return message.to_owned();
    };
    let head = message.split(", expected ").next().unwrap_or(message);
    format!("{head}, expected {expected}")
}

/// What a key accepts, for type errors.
fn expected_for(key: &str) -> Option<&'static str> {
    // Array elements accept what their array holds.
    let key = key.split('[').next().unwrap_or(key);
    Some(match key {
        "workflow" | "sandbox" | "limits" | "pool" | "env" | "llm" | "network" => "a table",
        // `tenant = "kid"` belongs in [workflow]; at the top level it is the
        // [tenant] table.
        "tenant" => {
            "a table, e.g. [tenant] with memory_max = \"1G\"; the tenant's name goes in \
             [workflow] as tenant = \"kid\""
        }
        "workflow.clients" => "a table, e.g. clients = { users = [\"alice\"], groups = [] }",
        "workflow.name" | "workflow.tenant" => "a string, e.g. \"homework\"",
        "workflow.user" => "a string, e.g. \"corral-kid\"",
        "workflow.clients.users" | "workflow.clients.groups" => "a list of unix names, e.g. [\"alice\"]",
        "sandbox.landlock" => "\"required\" or \"best-effort\"",
        "sandbox.read" | "sandbox.write" | "sandbox.exec" => "a list of paths, e.g. [\"/usr\", \"{workspace}/cache\"]",
        "sandbox.tcp_connect" | "sandbox.tcp_bind" => "a list of port numbers, e.g. [443]",
        "sandbox.seccomp" => "\"default\"",
        "limits.memory_max"
        | "limits.memory_swap_max"
        | "limits.output_max"
        | "limits.stdin_max"
        | "limits.file_size_max"
        | "limits.disk_max"
        | "tenant.memory_max" => "a size such as \"256M\" or an integer number of bytes",
        "limits.cpu_quota" | "tenant.cpu_quota" => "a percentage such as \"50%\"",
        "limits.call_timeout" => "a duration such as \"30s\", \"500ms\" or \"1m30s\"",
        "limits.tasks_max"
        | "limits.io_weight"
        | "limits.open_files_max"
        | "tenant.tasks_max"
        | "pool.min_idle"
        | "pool.max_workers"
        | "pool.queue"
        | "llm.max_steps"
        | "llm.daily_tokens"
        | "llm.tenant_daily_tokens" => "an integer",
        "limits.receipts" => "true or false",
        "llm.base_url" => "a URL such as \"http://127.0.0.1:11434/v1\"",
        "llm.model" => "a model name such as \"qwen2.5:3b\"",
        "llm.credential" => "a credential name such as \"ollama\"",
        "llm.endpoint_user" => "a user name such as \"ollama\"",
        "llm.endpoint_socket" => "an absolute path such as \"/run/ollama/api.sock\"",
        "network.allow" => "a list of hosts, e.g. [\"pypi.org\", \"*.pythonhosted.org\", \"api.github.com:443\"]",
        "network.private" => "true or false",
        "network.connections_max" => "an integer",
        "network.bytes_max" => "a size such as \"1G\" or an integer number of bytes",
        _ if key.starts_with("env.") => "a string",
        _ => return None,
    })
}

/// `; did you mean [table].key?` when an unknown key is valid in another table.
fn suggest(name: &str, path: &str) -> String {
    const TABLES: [&str; 9] =
        ["", "workflow", "workflow.clients", "sandbox", "limits", "tenant", "pool", "llm", "network"];
    let home =
        TABLES.into_iter().filter(|t| *t != path).find(|t| known_keys(t).is_some_and(|keys| keys.contains(&name)));
    match home {
        Some("") => format!("; did you mean the [{name}] table?"),
        Some(t) => format!("; did you mean to put it in [{t}]?"),
        None => String::new(),
    }
}
