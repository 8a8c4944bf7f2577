//! Tests of whole policy files and directories. Grammar tests live next to
//! each grammar (`units`, `names`, `path`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

const SHELL_TOOLS: &str = include_str!("../../policies/shell-tools.toml");
const FAMILY_CHAT: &str = include_str!("../../policies/family-chat.toml");
const HOMEWORK: &str = include_str!("../../policies/homework.toml");
const CODING: &str = include_str!("../../policies/coding.toml");

const MINIMAL: &str = "[workflow]\nname = \"w\"\ntenant = \"t\"\n";

fn parse(text: &str) -> Result<Workflow, PolicyError> {
    parse_workflow(Path::new("policies/x.toml"), text)
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(wf) => panic!("expected an error, got {wf:?}"),
        Err(e) => e.to_string(),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(files: &[(&str, &str)]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("corral-policy-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        Self(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn load_errors(dir: &TempDir) -> Vec<String> {
    match load_dir(&dir.0) {
        Ok(p) => panic!("expected errors, got {p:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn shipped_policies_parse() {
    let shell = parse_workflow(Path::new("policies/shell-tools.toml"), SHELL_TOOLS).unwrap();
    assert_eq!(shell.name.as_str(), "shell-tools");
    assert_eq!(shell.tenant.as_str(), "ops");
    assert_eq!(shell.user, None);
    assert_eq!(shell.clients.groups, ["corral-users"]);
    assert!(shell.sandbox.read.iter().any(|p| p.as_str() == "/proc"));
    assert_eq!(shell.sandbox.exec.len(), DEFAULT_EXEC.len());
    assert_eq!(shell.limits.call_timeout, Duration::from_secs(10));
    assert_eq!(shell.env["LANG"], "C.UTF-8");
    assert!(shell.llm.is_none());

    let chat = parse_workflow(Path::new("policies/family-chat.toml"), FAMILY_CHAT).unwrap();
    assert_eq!(chat.user.as_deref(), Some("corral-alice"));
    assert_eq!(chat.limits.memory_max, ByteSize::mib(512));
    assert_eq!(chat.limits.tasks_max, 128);
    let llm = chat.llm.unwrap();
    assert_eq!(llm.base_url, "http://127.0.0.1:11434/v1");
    assert_eq!(
        llm.endpoint,
        crate::policy::Endpoint::OwnedPort { addr: "127.0.0.1:11434".parse().unwrap(), owner: "ollama".into() }
    );
    assert_eq!(llm.daily_tokens, Some(200_000));
    assert_eq!(llm.max_steps, 8);

    let hw = parse_workflow(Path::new("policies/homework.toml"), HOMEWORK).unwrap();
    assert_eq!(hw.clients.users, ["kid", "alice"]);
    assert!(!hw.sandbox.read.iter().any(|p| p.as_str() == "/etc/ssl"));
    assert_eq!(hw.limits.cpu_quota, Some(Percent(25)));
    assert_eq!(hw.limits.output_max, ByteSize::kib(256));
    assert_eq!(hw.limits.file_size_max, ByteSize::mib(16));
    assert_eq!(hw.pool, PoolConfig { min_idle: 1, max_workers: 1, queue: 8 });
    assert_eq!(
        hw.tenant_limits,
        TenantLimits { memory_max: Some(ByteSize::mib(256)), cpu_quota: Some(Percent(50)), tasks_max: Some(64) }
    );
    let llm = hw.llm.unwrap();
    assert_eq!((llm.max_steps, llm.daily_tokens), (6, Some(50_000)));
    assert_eq!(
        chat.tenant_limits,
        TenantLimits { memory_max: Some(ByteSize::gib(1)), cpu_quota: None, tasks_max: Some(256) }
    );
    assert_eq!(shell.tenant_limits, TenantLimits::default());
    // git skips /etc/gitconfig instead of failing on it; multiprocessing
    // gets the worker's own /dev/shm.
    assert_eq!(shell.env["GIT_CONFIG_NOSYSTEM"], "1");
    assert!(shell.sandbox.write.iter().any(|p| p.as_str() == "/dev/shm"));

    let coding = parse_workflow(Path::new("policies/coding.toml"), CODING).unwrap();
    assert_eq!((coding.tenant.as_str(), coding.user.as_deref()), ("dev", Some("corral-dev")));
    // It may run what it builds: the workspace is writable and in exec.
    assert!(coding.sandbox.write.iter().any(|p| p.as_str() == "{workspace}"));
    assert!(coding.sandbox.exec.iter().any(|p| p.as_str() == "{workspace}"));
    for default in DEFAULT_EXEC {
        assert!(coding.sandbox.exec.iter().any(|p| p.as_str() == default), "{default}");
    }
    // No network until egress allow-lists exist.
    assert!(coding.sandbox.tcp_connect.is_empty() && coding.sandbox.tcp_bind.is_empty());
    assert_eq!(coding.limits.memory_max, ByteSize::gib(1));
    assert_eq!(coding.limits.call_timeout, Duration::from_secs(300));
    assert_eq!(coding.env["GIT_CONFIG_NOSYSTEM"], "1");
    assert!(coding.llm.is_none());
}

#[test]
fn shipped_policies_load_as_a_directory() {
    let dir = TempDir::new(&[
        ("shell-tools.toml", SHELL_TOOLS),
        ("family-chat.toml", FAMILY_CHAT),
        ("homework.toml", HOMEWORK),
        ("coding.toml", CODING),
        ("README.md", "not a policy"),
    ]);
    let policies = load_dir(&dir.0).unwrap();
    let names: Vec<&str> = policies.workflows.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["coding", "family-chat", "homework", "shell-tools"]);
    let tenant = |name: &str| name.parse::<TenantName>().unwrap();
    assert_eq!(policies.tenant_limits(&tenant("kid")).memory_max, Some(ByteSize::mib(256)));
    assert_eq!(policies.tenant_limits(&tenant("alice")).tasks_max, Some(256));
    assert_eq!(policies.tenant_limits(&tenant("ops")), TenantLimits::default());
    // corral-alice does not exist on a build host; the warning says how to add it.
    if nix::unistd::User::from_name("corral-alice").ok().flatten().is_none() {
        let expected = format!(
            "{}:12: workflow.user: user \"corral-alice\" does not exist on this host, so no worker \
             can start: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin corral-alice`",
            dir.file("family-chat.toml")
        );
        assert!(policies.warnings.contains(&expected), "{:#?}", policies.warnings);
    }
}

#[test]
fn defaults_are_filled() {
    let wf = parse(MINIMAL).unwrap();
    assert_eq!(wf.user, None);
    assert_eq!(wf.clients, Clients::default());
    let s = &wf.sandbox;
    assert_eq!(s.landlock, Requirement::Required);
    assert!(s.read.is_empty());
    let strs = |v: &[PathTemplate]| v.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(strs(&s.write), DEFAULT_WRITE);
    assert_eq!(strs(&s.exec), DEFAULT_EXEC);
    assert!(s.tcp_connect.is_empty() && s.tcp_bind.is_empty());
    assert_eq!(s.seccomp, SeccompProfile::Default);
    let l = &wf.limits;
    assert_eq!(
        *l,
        Limits {
            memory_max: ByteSize::mib(256),
            memory_swap_max: None,
            cpu_quota: None,
            tasks_max: 64,
            io_weight: None,
            call_timeout: Duration::from_secs(30),
            output_max: ByteSize::mib(1),
            stdin_max: ByteSize::mib(1),
            file_size_max: ByteSize::mib(64),
            open_files_max: 256,
            disk_max: None,
            receipts: true,
        }
    );
    assert_eq!(wf.pool, PoolConfig { min_idle: 1, max_workers: 2, queue: 32 });
    assert_eq!(wf.tenant_limits, TenantLimits::default());
    assert!(wf.env.is_empty());
    assert!(wf.llm.is_none());
    assert_eq!(wf.source, Path::new("policies/x.toml"));
    assert_eq!(wf.workspace(Path::new("/var/lib/corral")), Path::new("/var/lib/corral/workspaces/t/w"));
}

#[test]
fn serializes_units_as_strings() {
    let text = format!("{MINIMAL}[limits]\ncpu_quota = \"150%\"\ncall_timeout = \"1m30s\"\nmemory_max = 1073741824\n");
    let json = serde_json::to_value(parse(&text).unwrap()).unwrap();
    assert_eq!(json["name"], "w");
    assert_eq!(json["limits"]["memory_max"], "1G");
    assert_eq!(json["limits"]["cpu_quota"], "150%");
    assert_eq!(json["limits"]["call_timeout"], "1m30s");
    assert_eq!(json["sandbox"]["landlock"], "required");
    assert_eq!(json["sandbox"]["write"][0], "{workspace}");
}

#[test]
fn unknown_keys_name_file_line_key_and_valid_keys() {
    let text = format!("{MINIMAL}\n[sandbox]\nread = []\ncolour = \"blue\"\n");
    assert_eq!(
        error(&text),
        "policies/x.toml:7: sandbox.colour: unknown key; valid keys in [sandbox] are: \
         landlock, read, write, exec, tcp_connect, tcp_bind, seccomp"
    );
    assert_eq!(
        error(&format!("colour = 1\n{MINIMAL}")),
        "policies/x.toml:1: colour: unknown key; valid keys at the top level are: \
         workflow, sandbox, limits, tenant, pool, env, llm, network, sessions"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[limit]\n")),
        "policies/x.toml:4: limit: unknown key; valid keys at the top level are: \
         workflow, sandbox, limits, tenant, pool, env, llm, network, sessions"
    );
    // Inline table, one level deeper.
    assert_eq!(
        error(&format!("{MINIMAL}clients = {{ users = [], group = [\"g\"] }}\n")),
        "policies/x.toml:4: workflow.clients.group: unknown key; valid keys in \
         [workflow.clients] are: users, groups"
    );
    // A key in the wrong table says where it belongs.
    assert_eq!(
        error(&format!("{MINIMAL}memory_max = \"1G\"\n")),
        "policies/x.toml:4: workflow.memory_max: unknown key; valid keys in [workflow] are: \
         name, tenant, user, clients; did you mean to put it in [limits]?"
    );
    assert_eq!(
        error(&format!("{MINIMAL}llm = {{}}\n")),
        "policies/x.toml:4: workflow.llm: unknown key; valid keys in [workflow] are: \
         name, tenant, user, clients; did you mean the [llm] table?"
    );
    // Dotted keys.
    assert_eq!(
        error(&format!("pool.min_idel = 1\n{MINIMAL}")),
        "policies/x.toml:1: pool.min_idel: unknown key; valid keys in [pool] are: \
         min_idle, max_workers, queue"
    );
    // load_dir reports every unknown key of a file.
    let dir = TempDir::new(&[("a.toml", &format!("{MINIMAL}[sandbox]\nreed = []\n[limits]\nmemory = \"1G\"\n"))]);
    let errors = load_errors(&dir);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].starts_with(&format!("{}:5: sandbox.reed: unknown key", dir.file("a.toml"))));
    assert!(errors[1].starts_with(&format!("{}:7: limits.memory: unknown key", dir.file("a.toml"))));
}

#[test]
fn bad_names() {
    assert_eq!(
        error("[workflow]\nname = \"w\"\n\ntenant = \"Bad_Name\"\n"),
        "policies/x.toml:4: workflow.tenant: invalid name \"Bad_Name\": use 1-40 lowercase \
         letters, digits and '-', starting with a letter or digit"
    );
    assert_eq!(
        error("[workflow]\nname = \"-x\"\ntenant = \"t\"\n"),
        "policies/x.toml:2: workflow.name: invalid name \"-x\": use 1-40 lowercase \
         letters, digits and '-', starting with a letter or digit"
    );
    assert_eq!(
        error(&format!("{MINIMAL}user = \"Corral Kid\"\n")),
        "policies/x.toml:4: workflow.user: invalid unix name \"Corral Kid\": use up to 32 \
         lowercase letters, digits, '_' and '-', starting with a letter or '_'"
    );
    assert!(error(&format!("{MINIMAL}clients = {{ groups = [\"ok\", \"bad/x\"] }}\n"))
        .starts_with("policies/x.toml:4: workflow.clients.groups[1]: invalid unix name \"bad/x\""));
}

#[test]
fn missing_table_and_keys() {
    assert_eq!(
        error(""),
        "policies/x.toml: missing [workflow] table; add it, e.g. [workflow] with \
         name = \"homework\" and tenant = \"kid\""
    );
    assert_eq!(
        error("# comment\n[workflow]\nname = \"w\"\n"),
        "policies/x.toml:2: workflow.tenant: missing key; add it, e.g. tenant = \"kid\""
    );
    assert_eq!(
        error(&format!("{MINIMAL}\n[llm]\nbase_url = \"https://x/v1\"\n")),
        "policies/x.toml:5: llm.model: missing key; add it, e.g. model = \"qwen2.5:3b\""
    );
}

#[test]
fn bad_path_templates() {
    let cases = [
        (
            "{workspce}/x",
            "invalid path \"{workspce}/x\": the only placeholder is {workspace}, e.g. \"{workspace}/cache\"",
        ),
        (
            "relative",
            "invalid path \"relative\": must be absolute (start with '/') or start with {workspace}, e.g. \"/usr\"",
        ),
        ("/a/../b", "invalid path \"/a/../b\": '..' is not allowed; write the path it resolves to"),
    ];
    for (path, message) in cases {
        let text = format!("{MINIMAL}[sandbox]\nwrite = [\n  \"{{workspace}}\",\n  \"{path}\",\n]\n");
        assert_eq!(error(&text), format!("policies/x.toml:7: sandbox.write[1]: {message}"));
    }
}

#[test]
fn bad_units_in_files() {
    let limits = |body: &str| error(&format!("{MINIMAL}[limits]\n{body}\n"));
    assert_eq!(
        limits("memory_max = \"256Q\""),
        "policies/x.toml:5: limits.memory_max: invalid size \"256Q\": expected a number with an \
         optional K, M, G or T suffix, e.g. \"256M\""
    );
    assert_eq!(
        limits("memory_max = -1"),
        "policies/x.toml:5: limits.memory_max: invalid size \"-1\": a size cannot be negative"
    );
    assert_eq!(
        limits("memory_max = \"512K\""),
        "policies/x.toml:5: limits.memory_max: size \"512K\" is too small: expected at least \"1M\""
    );
    assert_eq!(
        limits("output_max = \"5M\""),
        "policies/x.toml:5: limits.output_max: size \"5M\" is too large: expected at most \"4M\""
    );
    assert_eq!(
        limits("call_timeout = \"30\""),
        "policies/x.toml:5: limits.call_timeout: invalid duration \"30\": missing unit; expected \
         a whole number with a unit h, m, s or ms, e.g. \"30s\", \"500ms\" or \"1m30s\""
    );
    assert_eq!(
        limits("call_timeout = \"5ms\""),
        "policies/x.toml:5: limits.call_timeout: duration \"5ms\" is out of range: expected \
         from 10ms to 24h"
    );
    assert_eq!(
        limits("call_timeout = 30"),
        "policies/x.toml:5: limits.call_timeout: invalid type: integer `30`, expected a \
         duration such as \"30s\", \"500ms\" or \"1m30s\""
    );
    assert_eq!(
        limits("cpu_quota = \"50\""),
        "policies/x.toml:5: limits.cpu_quota: invalid percentage \"50\": expected a whole number \
         followed by '%', e.g. \"50%\""
    );
    assert!(limits("cpu_quota = \"0%\"").starts_with("policies/x.toml:5: limits.cpu_quota: 0% would stop the workers"));
    assert_eq!(
        limits("tasks_max = 1"),
        "policies/x.toml:5: limits.tasks_max: 1 is out of range: expected an integer from 2 to 4194304"
    );
    assert_eq!(
        limits("tasks_max = \"64\""),
        "policies/x.toml:5: limits.tasks_max: invalid type: string \"64\", expected an integer"
    );
    assert_eq!(
        limits("open_files_max = 99999999999"),
        "policies/x.toml:5: limits.open_files_max: 99999999999 is out of range: expected an \
         integer from 16 to 65536"
    );
    assert_eq!(
        limits("disk_max = \"1M\""),
        "policies/x.toml:5: limits.disk_max: size \"1M\" is too small: expected at least \"8M\""
    );
    assert_eq!(
        error(&format!("{MINIMAL}[sandbox]\ntcp_connect = [443, 70000]\n")),
        "policies/x.toml:5: sandbox.tcp_connect[1]: invalid port 70000: expected a TCP port from 1 to 65535"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[sandbox]\nlandlock = \"maybe\"\n")),
        "policies/x.toml:5: sandbox.landlock: invalid value \"maybe\": expected \"required\" or \"best-effort\""
    );
}

#[test]
fn all_value_errors_of_a_file_are_reported() {
    let text = format!("{MINIMAL}[limits]\nmemory_max = \"lots\"\ncall_timeout = \"forever\"\n[pool]\nqueue = 0\n");
    let dir = TempDir::new(&[("a.toml", &text)]);
    let errors = load_errors(&dir);
    let a = dir.file("a.toml");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].starts_with(&format!("{a}:5: limits.memory_max: invalid size \"lots\"")));
    assert!(errors[1].starts_with(&format!("{a}:6: limits.call_timeout: invalid duration \"forever\"")));
    assert!(errors[2].starts_with(&format!("{a}:8: pool.queue: 0 is out of range")));
}

#[test]
fn min_idle_above_max_workers() {
    assert_eq!(
        error(&format!("{MINIMAL}[pool]\nmax_workers = 2\nmin_idle = 3\n")),
        "policies/x.toml:6: pool.min_idle: min_idle (3) is larger than max_workers (2): expected \
         min_idle <= max_workers; lower min_idle or raise max_workers"
    );
    // Default min_idle (1) against an explicit max_workers = 0 is a range error first.
    assert!(error(&format!("{MINIMAL}[pool]\nmax_workers = 0\n"))
        .starts_with("policies/x.toml:5: pool.max_workers: 0 is out of range"));
}

#[test]
fn toml_syntax_error_has_the_line() {
    let e = error("[workflow]\nname = \"w\"\ntenant = \"t\n\n");
    assert!(e.starts_with("policies/x.toml:3: invalid TOML: "), "{e}");
    let e = error("[workflow]\nname = \"w\"\nname = \"v\"\n");
    assert!(e.starts_with("policies/x.toml:3: invalid TOML: "), "{e}");
    assert_eq!(e, "policies/x.toml:3: invalid TOML: duplicate key (at `name`)");
}

#[test]
fn type_errors_name_the_key() {
    assert_eq!(
        error(&format!("{MINIMAL}[sandbox]\nread = [\"/usr\", 5]\n")),
        "policies/x.toml:5: sandbox.read[1]: invalid type: integer `5`, expected a list of paths, \
         e.g. [\"/usr\", \"{workspace}/cache\"]"
    );
    assert_eq!(
        error(&format!("sandbox = \"strict\"\n{MINIMAL}")),
        "policies/x.toml:1: sandbox: invalid type: string \"strict\", expected a table"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[[limits]]\ntasks_max = 8\n")),
        "policies/x.toml:4: limits: invalid type: array of tables, expected a table: \
         write [limits], not [[limits]]"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[env]\nDEBUG = 1\n")),
        "policies/x.toml:5: env.DEBUG: invalid type: integer `1`, expected a string"
    );
}

#[test]
fn empty_directory_is_an_error() {
    let dir = TempDir::new(&[("notes.txt", "x"), (".#a.toml", "lock file")]);
    let errors = load_errors(&dir);
    assert_eq!(
        errors,
        [format!("no policies found in {}: add one file per workflow, see policies/ for examples", dir.0.display())]
    );
    let missing = dir.0.join("absent");
    let e = load_dir(&missing).unwrap_err().to_string();
    assert!(e.starts_with(&format!("failed to read policy directory {}", missing.display())), "{e}");
}

#[test]
fn duplicate_names_and_tenant_users_across_files() {
    let a = "[workflow]\nname = \"w\"\ntenant = \"t\"\nuser = \"u1\"\n";
    let b = "# same name\n[workflow]\nname = \"w\"\ntenant = \"other\"\n";
    let c = "[workflow]\nname = \"c\"\ntenant = \"t\"\nuser = \"u2\"\n";
    let d = "[workflow]\nname = \"d\"\ntenant = \"t\"\n";
    let broken = "[workflow]\nname = \"e\"\ntenant = \"t\"\n[limits]\ntasks_max = 0\n";
    let dir = TempDir::new(&[("a.toml", a), ("b.toml", b), ("c.toml", c), ("d.toml", d), ("e.toml", broken)]);
    let f = |name| dir.file(name);
    let errors = load_errors(&dir);
    assert_eq!(
        errors,
        [
            format!("{}:5: limits.tasks_max: 0 is out of range: expected an integer from 2 to 4194304", f("e.toml")),
            format!(
                "{}:3: workflow.name: workflow name \"w\" is already used by {}:2: workflow.name; \
                 workflow names must be unique, rename one of them",
                f("b.toml"),
                f("a.toml")
            ),
            format!(
                "{}:4: workflow.user: tenant \"t\" runs as user \"u2\" here but as user \"u1\" in \
                 {}:4: workflow.user; a tenant is one unix user, so all its workflows must name the same user",
                f("c.toml"),
                f("a.toml")
            ),
            format!(
                "{}:3: workflow.tenant: tenant \"t\" runs as the broker's user (no `user` key) here \
                 but as user \"u1\" in {}:4: workflow.user; a tenant is one unix user, so all its \
                 workflows must name the same user",
                f("d.toml"),
                f("a.toml")
            ),
        ]
    );
    let all = load_dir(&dir.0).unwrap_err().to_string();
    assert_eq!(all.lines().count(), 4);
}

#[test]
fn host_warnings_name_file_line_and_fix() {
    let text = format!(
        "{MINIMAL}user = \"root\"\nclients = {{ users = [\"no-such-user-x\"], groups = [\"no-such-group-x\"] }}\n\
         [sandbox]\nread = [\"/usr\", \"/no/such/path\"]\n"
    );
    let dir = TempDir::new(&[("a.toml", &text)]);
    let p = load_dir(&dir.0).unwrap();
    let a = dir.file("a.toml");
    assert_eq!(
        p.warnings,
        [
            format!("{a}:7: sandbox.read[1]: /no/such/path does not exist on this host, so it grants nothing; remove it or create it"),
            format!("{a}:5: workflow.clients.users[0]: user \"no-such-user-x\" does not exist on this host, so this entry allows nobody: create it with `useradd no-such-user-x` or remove it"),
            format!("{a}:5: workflow.clients.groups[0]: group \"no-such-group-x\" does not exist on this host, so this entry allows nobody: create it with `groupadd --system no-such-group-x` or remove it"),
        ]
    );
}

#[test]
fn errors_display_one_per_line() {
    let errors =
        PolicyErrors(vec![PolicyError::NoPolicies { dir: "a".into() }, PolicyError::NoPolicies { dir: "b".into() }]);
    assert_eq!(errors.to_string().lines().count(), 2);
}

#[test]
fn tenant_table_parses() {
    let wf =
        parse(&format!("{MINIMAL}[tenant]\nmemory_max = \"1G\"\ncpu_quota = \"150%\"\ntasks_max = 256\n")).unwrap();
    assert_eq!(
        wf.tenant_limits,
        TenantLimits { memory_max: Some(ByteSize::gib(1)), cpu_quota: Some(Percent(150)), tasks_max: Some(256) }
    );
    // Every key is optional; [limits] is untouched by [tenant].
    let wf = parse(&format!("{MINIMAL}[tenant]\ntasks_max = 8\n")).unwrap();
    assert_eq!(wf.tenant_limits, TenantLimits { tasks_max: Some(8), ..TenantLimits::default() });
    assert_eq!(wf.limits.tasks_max, 64);
    // Dotted keys and an integer number of bytes.
    let wf = parse(&format!("tenant.memory_max = 1048576\n{MINIMAL}")).unwrap();
    assert_eq!(wf.tenant_limits.memory_max, Some(ByteSize::mib(1)));
    let json = serde_json::to_value(parse(&format!("{MINIMAL}[tenant]\nmemory_max = \"1G\"\n")).unwrap()).unwrap();
    assert_eq!(json["tenant_limits"]["memory_max"], "1G");
    assert_eq!(json["tenant_limits"]["cpu_quota"], serde_json::Value::Null);
}

#[test]
fn bad_tenant_values() {
    let tenant = |body: &str| error(&format!("{MINIMAL}\n[tenant]\n{body}\n"));
    assert_eq!(
        tenant("memory_max = \"512K\""),
        "policies/x.toml:6: tenant.memory_max: size \"512K\" is too small: expected at least \"1M\""
    );
    assert_eq!(
        tenant("memory_max = \"lots\""),
        "policies/x.toml:6: tenant.memory_max: invalid size \"lots\": expected a number with an \
         optional K, M, G or T suffix, e.g. \"256M\""
    );
    assert_eq!(
        tenant("memory_max = true"),
        "policies/x.toml:6: tenant.memory_max: invalid type: boolean `true`, expected a size \
         such as \"256M\" or an integer number of bytes"
    );
    assert_eq!(
        tenant("cpu_quota = \"50\""),
        "policies/x.toml:6: tenant.cpu_quota: invalid percentage \"50\": expected a whole number \
         followed by '%', e.g. \"50%\""
    );
    assert!(tenant("cpu_quota = \"0%\"").starts_with("policies/x.toml:6: tenant.cpu_quota: 0% would stop the workers"));
    assert_eq!(
        tenant("memory_max = \"1G\"\ntasks_max = 1"),
        "policies/x.toml:7: tenant.tasks_max: 1 is out of range: expected an integer from 2 to 4194304"
    );
    assert_eq!(
        tenant("tasks_max = 4194305"),
        "policies/x.toml:6: tenant.tasks_max: 4194305 is out of range: expected an integer from 2 to 4194304"
    );
    assert_eq!(
        tenant("tasks_max = \"64\""),
        "policies/x.toml:6: tenant.tasks_max: invalid type: string \"64\", expected an integer"
    );
    // The tenant's name written at the top level, where [tenant] is a table.
    assert_eq!(
        error(&format!("tenant = \"kid\"\n{MINIMAL}")),
        "policies/x.toml:1: tenant: invalid type: string \"kid\", expected a table, e.g. [tenant] \
         with memory_max = \"1G\"; the tenant's name goes in [workflow] as tenant = \"kid\""
    );
}

#[test]
fn unknown_key_in_tenant() {
    assert_eq!(
        error(&format!("{MINIMAL}[tenant]\nmemory_max = \"1G\"\nmemory = \"1G\"\n")),
        "policies/x.toml:6: tenant.memory: unknown key; valid keys in [tenant] are: \
         memory_max, cpu_quota, tasks_max"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[tenant]\ncall_timeout = \"30s\"\n")),
        "policies/x.toml:5: tenant.call_timeout: unknown key; valid keys in [tenant] are: \
         memory_max, cpu_quota, tasks_max; did you mean to put it in [limits]?"
    );
    assert_eq!(
        error(&format!("{MINIMAL}[tenant]\nname = \"kid\"\n")),
        "policies/x.toml:5: tenant.name: unknown key; valid keys in [tenant] are: \
         memory_max, cpu_quota, tasks_max; did you mean to put it in [workflow]?"
    );
}

const KID_A: &str = "[workflow]\nname = \"a\"\ntenant = \"kid\"\n";
const KID_B: &str = "[workflow]\nname = \"b\"\ntenant = \"kid\"\n";

#[test]
fn conflicting_tenant_tables_name_both_files() {
    let a = format!("{KID_A}\n[tenant]\nmemory_max = \"1G\"\ntasks_max = 256\n");
    let b = format!("{KID_B}[tenant]\nmemory_max = \"512M\"\ntasks_max = 256\n");
    let dir = TempDir::new(&[("a.toml", &a), ("b.toml", &b)]);
    assert_eq!(
        load_errors(&dir),
        [format!(
            "{}:5: tenant.memory_max: `[tenant]` of tenant \"kid\" differs from the one in \
             {}:6: tenant.memory_max (memory_max \"512M\" here but \"1G\" there); a tenant's \
             slice has one set of limits: make them equal or keep [tenant] in one file only",
            dir.file("b.toml"),
            dir.file("a.toml")
        )]
    );

    // A key only one side writes: each side points at what it has.
    let b = format!("{KID_B}[tenant]\ncpu_quota = \"50%\"\n");
    let dir = TempDir::new(&[("a.toml", &a), ("b.toml", &b)]);
    assert_eq!(
        load_errors(&dir),
        [format!(
            "{}:4: tenant: `[tenant]` of tenant \"kid\" differs from the one in {}:6: \
             tenant.memory_max (memory_max unset here but \"1G\" there, cpu_quota \"50%\" here \
             but unset there, tasks_max unset here but 256 there); a tenant's slice has one set \
             of limits: make them equal or keep [tenant] in one file only",
            dir.file("b.toml"),
            dir.file("a.toml")
        )]
    );

    // An empty [tenant] table is a table too: it says "no limits".
    let b = format!("{KID_B}[tenant]\n");
    let dir = TempDir::new(&[("a.toml", &a), ("b.toml", &b)]);
    let errors = load_errors(&dir);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!(
            "{}:4: tenant: `[tenant]` of tenant \"kid\" differs from the one in {}:6: tenant.memory_max",
            dir.file("b.toml"),
            dir.file("a.toml")
        )),
        "{errors:#?}"
    );
}

#[test]
fn tenant_table_in_one_file_is_inherited() {
    // Equal values, written differently, agree; files without the table and
    // other tenants are unaffected.
    let a = format!("{KID_A}[tenant]\nmemory_max = \"1G\"\ntasks_max = 256\n");
    let c = "[workflow]\nname = \"c\"\ntenant = \"kid\"\n[tenant]\ntasks_max = 256\nmemory_max = 1073741824\n";
    let other = "[workflow]\nname = \"d\"\ntenant = \"other\"\n";
    let dir = TempDir::new(&[("a.toml", &a), ("b.toml", KID_B), ("c.toml", c), ("d.toml", other)]);
    let p = load_dir(&dir.0).unwrap();
    let expected = TenantLimits { memory_max: Some(ByteSize::gib(1)), cpu_quota: None, tasks_max: Some(256) };
    let kid: TenantName = "kid".parse().unwrap();
    assert_eq!(p.tenant_limits(&kid), expected);
    for wf in p.workflows.iter().filter(|w| w.tenant == kid) {
        assert_eq!(wf.tenant_limits, expected, "{}", wf.name);
    }
    let other: TenantName = "other".parse().unwrap();
    assert_eq!(p.tenant_limits(&other), TenantLimits::default());
    let absent: TenantName = "absent".parse().unwrap();
    assert_eq!(p.tenant_limits(&absent), TenantLimits::default());

    // The file without the table alone parses to no limits.
    assert_eq!(parse(KID_B).unwrap().tenant_limits, TenantLimits::default());
}

#[test]
fn llm_timeout_and_spike_factor() {
    let llm = |body: &str| format!("{MINIMAL}[llm]\nbase_url = \"https://x/v1\"\nmodel = \"m\"\n{body}\n");
    let wf = parse(&llm("")).unwrap();
    let l = wf.llm.unwrap();
    assert_eq!(l.timeout, Duration::from_secs(30));
    assert!((l.spike_factor - 5.0).abs() < f64::EPSILON);
    let wf = parse(&llm("timeout = \"2s\"\nspike_factor = 3")).unwrap();
    let l = wf.llm.unwrap();
    assert_eq!(l.timeout, Duration::from_secs(2));
    assert!((l.spike_factor - 3.0).abs() < f64::EPSILON);
    let wf = parse(&llm("spike_factor = 2.5")).unwrap();
    assert!((wf.llm.unwrap().spike_factor - 2.5).abs() < f64::EPSILON);
    assert_eq!(
        error(&llm("spike_factor = 0.5")),
        "policies/x.toml:7: llm.spike_factor: 0.5 is out of range: expected a number above 1, \
         e.g. 5.0 (warn when an hour uses 5 times the trailing hourly average)"
    );
    assert_eq!(
        error(&llm("spike_factor = \"5\"")),
        "policies/x.toml:7: llm.spike_factor: invalid type: string \"5\", expected f64"
    );
    assert_eq!(
        error(&llm("timeout = \"10m1s\"")),
        "policies/x.toml:7: llm.timeout: duration \"10m1s\" is out of range: expected from \
         100ms to 10m"
    );
}

#[test]
fn llm_endpoints_anyone_could_squat_are_refused() {
    let llm = |body: &str| format!("{MINIMAL}[llm]\nmodel = \"m\"\n{body}\n");
    let e = error(&llm("base_url = \"http://127.0.0.1:11434/v1\""));
    assert!(e.contains(".toml:6: llm.base_url: 127.0.0.1:11434 is a port any local user"), "{e}");
    assert!(e.contains("endpoint_user = \"ollama\""), "{e}");
    let e = error(&llm("base_url = \"http://10.0.0.2:8080/v1\"\nendpoint_user = \"ollama\""));
    assert!(e.contains("llm.base_url: plain http to \"10.0.0.2\" is refused") && e.contains("https://"), "{e}");
    let e = error(&llm("base_url = \"http://localhost/v1\"\nendpoint_socket = \"api.sock\""));
    assert!(e.contains("llm.endpoint_socket:") && e.contains("absolute"), "{e}");
    let e = error(&llm("base_url = \"https://x/v1\"\nendpoint_user = \"-x\""));
    assert!(e.contains("llm.endpoint_user: invalid user name"), "{e}");
    let ok = parse(&llm("base_url = \"http://127.0.0.1:11434/v1\"\nendpoint_user = \"ollama\"")).unwrap();
    assert!(matches!(ok.llm.unwrap().endpoint, crate::policy::Endpoint::OwnedPort { .. }));
}

#[test]
fn network_tables_validate_with_file_line_and_key() {
    let ok = parse(&format!(
        "{MINIMAL}\n[network]\nallow = [\"pypi.org\", \"*.pythonhosted.org\", \"api.github.com:443\"]\n"
    ))
    .unwrap();
    let n = ok.network.unwrap();
    assert_eq!(n.allow.len(), 3);
    assert!(!n.private, "private defaults to false");
    assert!(n.allows("files.pythonhosted.org", 443).is_some());
    assert!(n.allows("api.github.com", 80).is_none());
    assert_eq!((n.connections_max, n.bytes_max), (256, ByteSize::gib(1)));
    assert!(parse(MINIMAL).unwrap().network.is_none(), "no [network]: today's behaviour");

    let e = error(&format!("{MINIMAL}\n[network]\nallow = [\"pypi.org\", \"*.org\"]\n"));
    assert!(e.starts_with("policies/x.toml:6: network.allow[1]: invalid entry \"*.org\""), "{e}");
    let e = error(&format!("{MINIMAL}\n[network]\nconnections_max = 0\n"));
    assert!(e.starts_with("policies/x.toml:6: network.connections_max: 0 is out of range"), "{e}");
    let e = error(&format!("{MINIMAL}\n[sandbox]\ntcp_connect = [443]\n\n[network]\nallow = [\"pypi.org\"]\n"));
    assert!(e.contains("sandbox.tcp_connect: a workflow with [network] reaches the network only through"), "{e}");
    let e = error(&format!("{MINIMAL}\n[network]\nallow = \"pypi.org\"\n"));
    assert!(e.contains("network.allow") && e.contains("a list of hosts"), "{e}");
}

#[test]
fn sessions_have_defaults_and_bounds() {
    let wf = parse(MINIMAL).unwrap();
    assert_eq!((wf.sessions.idle, wf.sessions.max), (Duration::from_secs(24 * 3600), 32));
    let wf = parse(&format!("{MINIMAL}[sessions]\nidle = \"2s\"\nmax = 2\n")).unwrap();
    assert_eq!((wf.sessions.idle, wf.sessions.max), (Duration::from_secs(2), 2));
    assert!(error(&format!("{MINIMAL}[sessions]\nidle = \"10ms\"\n")).contains("sessions.idle"));
    assert!(error(&format!("{MINIMAL}[sessions]\nmax = 0\n")).contains("sessions.max"));
    assert!(error(&format!("{MINIMAL}[sessions]\nkeep = 1\n")).contains("valid keys in [sessions] are: idle, max"));
}
