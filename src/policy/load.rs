//! Reading policy files: one file ([`parse_workflow`]) and a directory
//! ([`load_dir`]) with the checks that span files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::document::{Document, Lines};
use super::error::{FirstUser, Place, PolicyError, PolicyErrors};
use super::host::host_warnings;
use super::names::TenantName;
use super::raw::RawFile;
use super::schema::{TenantLimits, Workflow};
use super::validate::validate;

/// All workflows of a directory, sorted by name, plus non-fatal findings
/// about this host (paths, users and groups that do not exist).
#[derive(Debug, Clone, Serialize)]
pub struct Policies {
    /// The workflows, sorted by name.
    pub workflows: Vec<Workflow>,
    /// One line each, naming the file and what to do.
    pub warnings: Vec<String>,
}

impl Policies {
    /// The `[tenant]` limits of `tenant`, whichever of its files defines
    /// them (they agree, or the directory would not have loaded); all `None`
    /// when none does or the tenant has no workflow here.
    pub fn tenant_limits(&self, tenant: &TenantName) -> TenantLimits {
        self.workflows.iter().find(|w| w.tenant == *tenant).map(|w| w.tenant_limits.clone()).unwrap_or_default()
    }
}

/// A workflow with the line of each key of its file.
pub(crate) struct Parsed {
    pub workflow: Workflow,
    pub lines: Lines,
}

impl Parsed {
    pub fn place(&self, key: &str) -> Place {
        Place { file: self.workflow.source.clone(), line: self.lines.of(key), key: Some(key.to_owned()) }
    }
}

/// Parses and validates one file's text; `path` is only used in messages.
/// Returns the first problem; [`load_dir`] reports all of them.
pub fn parse_workflow(path: &Path, text: &str) -> Result<Workflow, PolicyError> {
    match parse(path, text) {
        Ok(parsed) => Ok(parsed.workflow),
        Err(mut errors) => Err(if errors.is_empty() {
            // Unreachable: `parse` never fails without an error.
            PolicyError::Invalid {
                at: Place { file: path.to_path_buf(), line: None, key: None },
                message: "invalid policy".to_owned(),
            }
        } else {
            errors.swap_remove(0)
        }),
    }
}

/// Syntax, then unknown keys, then types, then values: each stage reports
/// everything it finds, and a stage runs only if the one before passed.
pub(crate) fn parse(path: &Path, text: &str) -> Result<Parsed, Vec<PolicyError>> {
    let doc = Document::parse(path, text).map_err(|e| vec![e])?;
    let unknown = doc.unknown_keys();
    if !unknown.is_empty() {
        return Err(unknown);
    }
    let raw =
        toml::de::Deserializer::parse(text).and_then(RawFile::deserialize).map_err(|e| vec![doc.serde_error(&e)])?;
    let lines = doc.lines();
    let workflow = validate(path, &lines, raw)?;
    Ok(Parsed { workflow, lines })
}

/// Loads every `*.toml` in `dir`: non-recursive, sorted by file name, other
/// files and names starting with `.` (editor lock files) ignored. Collects
/// all errors of all files rather than stopping at the first.
pub fn load_dir(dir: &Path) -> Result<Policies, PolicyErrors> {
    let files = policy_files(dir)?;
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    for path in files {
        match fs::read_to_string(&path) {
            Ok(text) => match parse(&path, &text) {
                Ok(p) => parsed.push(p),
                Err(e) => errors.extend(e),
            },
            Err(source) => errors.push(PolicyError::ReadFile { path, source }),
        }
    }
    errors.extend(cross_file_errors(&parsed));
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let warnings = host_warnings(&parsed);
    inherit_tenant_limits(&mut parsed);
    let mut workflows: Vec<Workflow> = parsed.into_iter().map(|p| p.workflow).collect();
    workflows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Policies { workflows, warnings })
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_dir_error = |source| PolicyError::ReadDir { dir: dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a link to a policy file is a policy file.
        if path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(PolicyError::NoPolicies { dir: dir.to_path_buf() });
    }
    files.sort();
    Ok(files)
}

/// Duplicate workflow names, and tenants whose workflows name different users.
fn cross_file_errors(parsed: &[Parsed]) -> Vec<PolicyError> {
    let mut errors = Vec::new();
    let mut names: BTreeMap<&str, &Parsed> = BTreeMap::new();
    let mut tenants: BTreeMap<&str, &Parsed> = BTreeMap::new();
    // The first workflow of each tenant whose file has a [tenant] table.
    let mut tenant_tables: BTreeMap<&str, &Parsed> = BTreeMap::new();
    for p in parsed {
        let wf = &p.workflow;
        match names.get(wf.name.as_str()) {
            Some(first) => errors.push(PolicyError::DuplicateWorkflow {
                at: p.place("workflow.name"),
                name: wf.name.to_string(),
                first: Box::new(first.place("workflow.name")),
            }),
            None => {
                names.insert(wf.name.as_str(), p);
            }
        }
        match tenants.get(wf.tenant.as_str()) {
            Some(first) if first.workflow.user != wf.user => {
                errors.push(PolicyError::TenantUserConflict {
                    at: p.place(user_key(p)),
                    tenant: wf.tenant.to_string(),
                    user: render_user(wf.user.as_deref()),
                    first: Box::new(FirstUser {
                        at: first.place(user_key(first)),
                        user: render_user(first.workflow.user.as_deref()),
                    }),
                });
            }
            Some(_) => {}
            None => {
                tenants.insert(wf.tenant.as_str(), p);
            }
        }
        if !p.lines.has("tenant") {
            continue;
        }
        match tenant_tables.get(wf.tenant.as_str()) {
            Some(first) if first.workflow.tenant_limits != wf.tenant_limits => {
                let (key, diff) = tenant_limits_diff(&wf.tenant_limits, &first.workflow.tenant_limits);
                errors.push(PolicyError::TenantLimitsConflict {
                    at: p.place(&tenant_key(p, key)),
                    tenant: wf.tenant.to_string(),
                    diff,
                    first: Box::new(first.place(&tenant_key(first, key))),
                });
            }
            Some(_) => {}
            None => {
                tenant_tables.insert(wf.tenant.as_str(), p);
            }
        }
    }
    errors
}

/// Gives every workflow its tenant's `[tenant]` table, from whichever file
/// of the tenant has one. Runs after `cross_file_errors` found no conflict.
fn inherit_tenant_limits(parsed: &mut [Parsed]) {
    let mut tables: BTreeMap<TenantName, TenantLimits> = BTreeMap::new();
    for p in parsed.iter().filter(|p| p.lines.has("tenant")) {
        tables.entry(p.workflow.tenant.clone()).or_insert_with(|| p.workflow.tenant_limits.clone());
    }
    for p in parsed {
        if let Some(table) = tables.get(&p.workflow.tenant) {
            p.workflow.tenant_limits = table.clone();
        }
    }
}

/// The first differing key of two `[tenant]` tables (without `tenant.`),
/// and every difference rendered, e.g. `memory_max "512M" here but "1G" there`.
fn tenant_limits_diff(here: &TenantLimits, there: &TenantLimits) -> (&'static str, String) {
    fn show<T: ToString>(v: Option<T>, quoted: bool) -> String {
        match v {
            None => "unset".to_owned(),
            Some(v) if quoted => format!("{:?}", v.to_string()),
            Some(v) => v.to_string(),
        }
    }
    let fields = [
        ("memory_max", show(here.memory_max, true), show(there.memory_max, true)),
        ("cpu_quota", show(here.cpu_quota, true), show(there.cpu_quota, true)),
        ("tasks_max", show(here.tasks_max, false), show(there.tasks_max, false)),
    ];
    let differing: Vec<_> = fields.into_iter().filter(|(_, a, b)| a != b).collect();
    let first = differing.first().map_or("", |(key, _, _)| *key);
    let diff =
        differing.iter().map(|(key, a, b)| format!("{key} {a} here but {b} there")).collect::<Vec<_>>().join(", ");
    (first, diff)
}

/// The key to point at in a `[tenant]` conflict: `tenant.<key>` when the
/// file writes it, else the `[tenant]` header.
fn tenant_key(p: &Parsed, key: &str) -> String {
    let full = format!("tenant.{key}");
    if !key.is_empty() && p.lines.has(&full) {
        full
    } else {
        "tenant".to_owned()
    }
}

/// The key to point at for a workflow's user: `user`, or `tenant` when the
/// file has no `user` key.
fn user_key(p: &Parsed) -> &'static str {
    if p.workflow.user.is_some() {
        "workflow.user"
    } else {
        "workflow.tenant"
    }
}

pub(crate) fn render_user(user: Option<&str>) -> String {
    match user {
        Some(u) => format!("user {u:?}"),
        None => "the broker's user (no `user` key)".to_owned(),
    }
}
