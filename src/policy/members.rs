//! The members file (`/etc/corral/members.toml`): the people a bot speaks
//! for, their tenant, the workflows they may use, their limits and their
//! rights per kind of chat; the unix users that may act for them
//! (delegates); and limits per tenant. Validated like the policies, and
//! against them: every error names the file, the line and the key.
//!
//! ```toml
//! [delegates]
//! users = ["corral-bot"]            # unix users that may act for a member (x-corral-member)
//!
//! [[member]]
//! name = "alice"                    # required; 1-40 of a-z 0-9 - _
//! tenant = "alice"                  # required; a tenant of the policies
//! user = "alice"                    # optional: her own login; her direct calls count as hers
//! telegram = [111111]               # optional: Telegram user ids linked to her (unique)
//! workflows = ["family-chat"]       # required, at least one, all of her tenant; the first
//!                                   # is the default of a delegated call that names none
//! requests_per_minute = 30          # optional limits (unset: none)
//! concurrent = 2
//! tokens_per_day = 200000
//! chats.private = ["shell", "read_file", "write_file", "list_dir"]   # default: all four
//! chats.group = ["read_file"]                                         # default: all four
//!
//! [tenant.kid]                      # optional: limits over every call to the tenant's workflows
//! requests_per_minute = 20
//! concurrent = 2
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::document::{Document, Lines};
use super::error::{Place, PolicyError, PolicyErrors};
use super::load::Policies;

/// The default members file.
pub const DEFAULT_MEMBERS: &str = "/etc/corral/members.toml";

/// The tools an ask offers; a chat's rights are a subset.
pub const TOOLS: [&str; 4] = ["shell", "read_file", "write_file", "list_dir"];

/// Limits on calls: a sliding minute and calls at once; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub concurrent: Option<u32>,
}

/// The kind of chat a delegate speaks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Chat {
    #[default]
    Private,
    Group,
}

impl Chat {
    pub fn as_str(self) -> &'static str {
        match self {
            Chat::Private => "private",
            Chat::Group => "group",
        }
    }
}

/// One member, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub tenant: String,
    /// Her own unix login and its uid.
    pub user: Option<(String, u32)>,
    pub telegram: Vec<i64>,
    /// At least one; the first is the default.
    pub workflows: Vec<String>,
    pub limits: RateLimits,
    pub tokens_per_day: Option<u64>,
    /// Tools allowed in a private chat, and in a group chat.
    pub private: Vec<String>,
    pub group: Vec<String>,
}

impl Member {
    /// The tools allowed in `chat`.
    pub fn tools(&self, chat: Chat) -> &[String] {
        match chat {
            Chat::Private => &self.private,
            Chat::Group => &self.group,
        }
    }
}

/// The members file, validated.
#[derive(Debug, Clone, Default)]
pub struct Members {
    /// The file; `None` when there is none (no members).
    pub source: Option<PathBuf>,
    /// Delegates: name and uid.
    pub delegates: Vec<(String, u32)>,
    pub members: Vec<Arc<Member>>,
    /// Limits per tenant.
    pub tenants: BTreeMap<String, RateLimits>,
}

impl Members {
    pub fn is_delegate(&self, uid: u32) -> bool {
        self.delegates.iter().any(|(_, u)| *u == uid)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn by_telegram(&self, id: i64) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| m.telegram.contains(&id))
    }

    /// The member whose own login is `uid`.
    pub fn by_uid(&self, uid: u32) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| m.user.as_ref().is_some_and(|(_, u)| *u == uid))
    }

    pub fn tenant_limits(&self, tenant: &str) -> RateLimits {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    delegates: RawDelegates,
    #[serde(default)]
    member: Vec<RawMember>,
    #[serde(default)]
    tenant: BTreeMap<String, RawLimits>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelegates {
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: String,
    tenant: String,
    user: Option<String>,
    #[serde(default)]
    telegram: Vec<i64>,
    workflows: Vec<String>,
    requests_per_minute: Option<u32>,
    concurrent: Option<u32>,
    tokens_per_day: Option<u64>,
    #[serde(default)]
    chats: RawChats,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChats {
    private: Option<Vec<String>>,
    group: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_minute: Option<u32>,
    concurrent: Option<u32>,
}

/// Loads `path`. A missing file is no members unless `required` (a file
/// named on the command line must exist).
pub fn load_members(path: &Path, required: bool, policies: &Policies) -> Result<Members, PolicyErrors> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(Members::default()),
        Err(source) => return Err(PolicyError::ReadFile { path: path.to_path_buf(), source }.into()),
    };
    parse_members(path, &text, policies).map_err(PolicyErrors)
}

/// Parses and validates the text of a members file.
pub fn parse_members(path: &Path, text: &str, policies: &Policies) -> Result<Members, Vec<PolicyError>> {
    let doc = Document::parse(path, text).map_err(|e| vec![e])?;
    let raw =
        toml::de::Deserializer::parse(text).and_then(RawFile::deserialize).map_err(|e| vec![doc.serde_error(&e)])?;
    let v = Validator { file: path, lines: doc.lines(), errors: Vec::new() };
    v.run(raw, policies)
}

struct Validator<'a> {
    file: &'a Path,
    lines: Lines,
    errors: Vec<PolicyError>,
}

fn uid_of(user: &str) -> Option<u32> {
    nix::unistd::User::from_name(user).ok().flatten().map(|u| u.uid.as_raw())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Validator<'_> {
    fn bad(&mut self, key: String, message: String) {
        let at = Place { file: self.file.to_path_buf(), line: self.lines.of(&key), key: Some(key) };
        self.errors.push(PolicyError::Invalid { at, message });
    }

    fn user(&mut self, key: String, name: &str) -> Option<u32> {
        let uid = uid_of(name);
        if uid.is_none() {
            self.bad(key, format!("no unix user {name:?} on this host; create it (useradd) or fix the name"));
        }
        uid
    }

    fn limit<T: Copy + PartialEq + Default + std::fmt::Display>(&mut self, key: String, v: Option<T>) -> Option<T> {
        if v == Some(T::default()) {
            self.bad(key, "must be at least 1; leave the key out for no limit".into());
        }
        v
    }

    fn tools(&mut self, key: String, list: Option<Vec<String>>) -> Vec<String> {
        let Some(list) = list else {
            return TOOLS.iter().map(|t| t.to_string()).collect();
        };
        for (i, t) in list.iter().enumerate() {
            if !TOOLS.contains(&t.as_str()) {
                self.bad(format!("{key}[{i}]"), format!("unknown tool {t:?}; the tools are {}", TOOLS.join(", ")));
            }
        }
        list
    }

    fn run(mut self, raw: RawFile, policies: &Policies) -> Result<Members, Vec<PolicyError>> {
        let mut out = Members { source: Some(self.file.to_path_buf()), ..Members::default() };
        for (i, name) in raw.delegates.users.iter().enumerate() {
            if let Some(uid) = self.user(format!("delegates.users[{i}]"), name) {
                out.delegates.push((name.clone(), uid));
            }
        }
        let tenants: Vec<&str> = policies.workflows.iter().map(|w| w.tenant.as_str()).collect();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut telegram: HashMap<i64, String> = HashMap::new();
        let mut users: HashMap<u32, String> = HashMap::new();
        for (i, m) in raw.member.into_iter().enumerate() {
            let k = |key: &str| format!("member[{i}].{key}");
            if !valid_name(&m.name) {
                self.bad(k("name"), format!("invalid member name {:?}: use 1-40 of a-z, 0-9, '-' and '_'", m.name));
            }
            if let Some(first) = names.insert(m.name.clone(), i) {
                self.bad(
                    k("name"),
                    format!("member {:?} is already defined as member[{first}]; names are unique", m.name),
                );
            }
            if !tenants.contains(&m.tenant.as_str()) {
                self.bad(
                    k("tenant"),
                    format!("no policy has tenant {:?}; the tenants are: {}", m.tenant, tenants.join(", ")),
                );
            }
            let user = match &m.user {
                Some(u) => self.user(k("user"), u).map(|uid| (u.clone(), uid)),
                None => None,
            };
            if let Some((u, uid)) = &user {
                if let Some(other) = users.insert(*uid, m.name.clone()) {
                    self.bad(k("user"), format!("user {u:?} is already member {other:?}'s; a login is one member"));
                }
            }
            for (j, id) in m.telegram.iter().enumerate() {
                if *id <= 0 {
                    self.bad(format!("{}[{j}]", k("telegram")), format!("{id} is not a Telegram user id (> 0)"));
                }
                if let Some(other) = telegram.insert(*id, m.name.clone()) {
                    self.bad(
                        format!("{}[{j}]", k("telegram")),
                        format!("Telegram id {id} is already linked to member {other:?}; an id is one member"),
                    );
                }
            }
            if m.workflows.is_empty() {
                self.bad(k("workflows"), "list at least one workflow; the first is the default".into());
            }
            for (j, w) in m.workflows.iter().enumerate() {
                match policies.workflows.iter().find(|p| p.name.as_str() == w) {
                    None => self.bad(format!("{}[{j}]", k("workflows")), format!("no policy defines workflow {w:?}")),
                    Some(p) if p.tenant.as_str() != m.tenant => self.bad(
                        format!("{}[{j}]", k("workflows")),
                        format!(
                            "workflow {w:?} belongs to tenant {:?}, not to the member's tenant {:?}",
                            p.tenant.as_str(),
                            m.tenant
                        ),
                    ),
                    Some(_) => {}
                }
            }
            let limits = RateLimits {
                requests_per_minute: self.limit(k("requests_per_minute"), m.requests_per_minute),
                concurrent: self.limit(k("concurrent"), m.concurrent),
            };
            let tokens_per_day = self.limit(k("tokens_per_day"), m.tokens_per_day);
            let private = self.tools(k("chats.private"), m.chats.private);
            let group = self.tools(k("chats.group"), m.chats.group);
            out.members.push(Arc::new(Member {
                name: m.name,
                tenant: m.tenant,
                user,
                telegram: m.telegram,
                workflows: m.workflows,
                limits,
                tokens_per_day,
                private,
                group,
            }));
        }
        for (t, l) in raw.tenant {
            let k = |key: &str| format!("tenant.{t}.{key}");
            if !tenants.contains(&t.as_str()) {
                self.bad(
                    format!("tenant.{t}"),
                    format!("no policy has tenant {t:?}; the tenants are: {}", tenants.join(", ")),
                );
            }
            let limits = RateLimits {
                requests_per_minute: self.limit(k("requests_per_minute"), l.requests_per_minute),
                concurrent: self.limit(k("concurrent"), l.concurrent),
            };
            out.tenants.insert(t, limits);
        }
        if self.errors.is_empty() {
            Ok(out)
        } else {
            Err(self.errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Policies {
        let wf = |name: &str, tenant: &str| {
            let text = format!("[workflow]\nname = \"{name}\"\ntenant = \"{tenant}\"\n");
            super::super::parse_workflow(Path::new("p.toml"), &text).unwrap()
        };
        Policies { workflows: vec![wf("chat", "alice"), wf("homework", "kid"), wf("games", "kid")], warnings: vec![] }
    }

    fn parse(text: &str) -> Result<Members, String> {
        parse_members(Path::new("members.toml"), text, &policies())
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
    }

    const GOOD: &str = r#"
[delegates]
users = ["root"]

[[member]]
name = "alice"
tenant = "alice"
user = "root"
telegram = [111]
workflows = ["chat"]
requests_per_minute = 30

[[member]]
name = "kid"
tenant = "kid"
telegram = [222, 333]
workflows = ["homework", "games"]
concurrent = 1
tokens_per_day = 1000
chats.group = ["read_file"]

[tenant.kid]
requests_per_minute = 20
"#;

    #[test]
    fn a_good_file_loads_with_its_defaults() {
        let m = parse(GOOD).unwrap();
        assert!(m.is_delegate(0));
        let alice = m.by_name("alice").unwrap();
        assert_eq!(alice.user, Some(("root".into(), 0)));
        assert_eq!(alice.limits.requests_per_minute, Some(30));
        assert_eq!(alice.tools(Chat::Group), TOOLS, "all four tools by default");
        let kid = m.by_telegram(333).unwrap();
        assert_eq!(kid.name, "kid");
        assert_eq!(kid.tools(Chat::Group), ["read_file"]);
        assert_eq!(kid.tools(Chat::Private).len(), 4);
        assert_eq!((kid.limits.concurrent, kid.tokens_per_day), (Some(1), Some(1000)));
        assert_eq!(m.by_uid(0).unwrap().name, "alice");
        assert_eq!(m.tenant_limits("kid").requests_per_minute, Some(20));
        assert_eq!(m.tenant_limits("alice"), RateLimits::default());
        assert!(parse("").unwrap().members.is_empty(), "an empty file is no members");
    }

    #[test]
    fn mistakes_are_refused_with_file_line_and_key() {
        let e = parse(&GOOD.replace("concurrent = 1", "concurent = 1")).unwrap_err();
        assert!(e.contains("members.toml:18: member[1].concurent") && e.contains("unknown field `concurent`"), "{e}");
        let e = parse(&GOOD.replace("workflows = [\"chat\"]", "workflows = [\"homework\"]")).unwrap_err();
        assert!(e.contains("member[0].workflows[0]") && e.contains("belongs to tenant \"kid\""), "{e}");
        let e = parse(&GOOD.replace("\"games\"]", "\"nope\"]")).unwrap_err();
        assert!(e.contains(":17: member[1].workflows[1]") && e.contains("no policy defines"), "{e}");
        let e = parse(&GOOD.replace("[222, 333]", "[111]")).unwrap_err();
        assert!(e.contains("already linked to member \"alice\""), "{e}");
        let e = parse(&GOOD.replace("name = \"kid\"", "name = \"alice\"")).unwrap_err();
        assert!(e.contains("already defined"), "{e}");
        let e = parse(&GOOD.replace("[\"read_file\"]", "[\"rm\"]")).unwrap_err();
        assert!(e.contains("member[1].chats.group[0]") && e.contains("unknown tool \"rm\""), "{e}");
        let e = parse(&GOOD.replace("users = [\"root\"]", "users = [\"no-such-user-x\"]")).unwrap_err();
        assert!(e.contains(":3: delegates.users[0]") && e.contains("no unix user"), "{e}");
        let e = parse(&GOOD.replace("[tenant.kid]", "[tenant.kdi]")).unwrap_err();
        assert!(e.contains("tenant.kdi") && e.contains("no policy has tenant"), "{e}");
        let e = parse(&GOOD.replace("concurrent = 1", "concurrent = 0")).unwrap_err();
        assert!(e.contains("member[1].concurrent") && e.contains("at least 1"), "{e}");
        let e = parse(&GOOD.replace("tenant = \"kid\"\ntelegram", "tenant = \"bob\"\ntelegram")).unwrap_err();
        assert!(e.contains("member[1].tenant"), "{e}");
    }

    #[test]
    fn a_missing_file_is_no_members_unless_named() {
        let p = Path::new("/nonexistent/members.toml");
        assert!(load_members(p, false, &policies()).unwrap().members.is_empty());
        let e = load_members(p, true, &policies()).unwrap_err().to_string();
        assert!(e.contains("failed to read /nonexistent/members.toml"), "{e}");
    }
}
