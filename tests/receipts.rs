//! Receipts: every exec reply says what the call changed in its workspace
//! (and nothing it left alone), which limit ended it, and its peak memory
//! and CPU. One broker serves every case; each workflow has its own
//! workspace, so the cases cannot see each other's files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The paths of one list of a receipt's changes, in order.
fn paths(r: &Value, list: &str) -> Vec<String> {
    r["receipt"]["changes"][list].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap().to_string()).collect()
}

fn counts(r: &Value) -> (u64, u64, u64) {
    let c = &r["receipt"]["changes"];
    (c["created_count"].as_u64().unwrap(), c["modified_count"].as_u64().unwrap(), c["deleted_count"].as_u64().unwrap())
}

#[test]
fn receipts_list_changes_limits_and_usage() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "receipts",
        &[
            policy("rc", "t", None, "", "file_size_max = \"1M\"", "max_workers = 1"),
            policy("rc-off", "t", None, "", "receipts = false", "max_workers = 1"),
        ],
    );

    // The files the call will find.
    let r = b.sh("rc", "echo same > keep; echo old > edit; echo 12345 > gone; mkdir sub; ln -s /etc/passwd link");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert_eq!(paths(&r, "created"), ["edit", "gone", "keep", "link", "sub"], "{r:#}");

    // Created, modified, deleted: exactly those, and none of the files the
    // call only read or left alone (keep, link, sub).
    let r = b.sh("rc", "cat keep >/dev/null; echo more >> edit; rm gone; echo abc > sub/new; mkdir made");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    let c = &r["receipt"]["changes"];
    assert_eq!(paths(&r, "created"), ["made", "sub/new"], "{r:#}");
    assert_eq!(paths(&r, "modified"), ["edit"], "{r:#}");
    assert_eq!(paths(&r, "deleted"), ["gone"], "{r:#}");
    assert_eq!(counts(&r), (2, 1, 1), "{r:#}");
    assert_eq!(c["modified"][0]["size"], 9, "{r:#}");
    assert_eq!(c["modified"][0]["size_before"], 4, "{r:#}");
    assert_eq!(c["deleted"][0]["size"], 6, "{r:#}");
    assert_eq!(c["created"][0]["kind"], "dir", "{r:#}");
    assert_eq!((c["truncated"].as_bool(), c["incomplete"].is_null()), (Some(false), true), "{r:#}");
    assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");

    // A call that changes nothing has an empty receipt.
    let r = b.exec("rc", &["cat", "keep"]);
    assert_eq!(counts(&r), (0, 0, 0), "{r:#}");

    // The lists are capped, the counts and totals are not, and the
    // receipt says that it cut them.
    let r = b.sh("rc", "i=0; while [ $i -lt 150 ]; do echo x > f$i; i=$((i+1)); done");
    let c = &r["receipt"]["changes"];
    assert_eq!(c["created_count"], 150, "{c:#}");
    assert_eq!(c["created_bytes"], 300, "{c:#}");
    assert_eq!(c["created"].as_array().unwrap().len() as u64, c["listed_max"].as_u64().unwrap(), "{c:#}");
    assert!(c["listed_max"].as_u64().unwrap() < 150, "{c:#}");
    assert_eq!(c["truncated"], true, "{c:#}");
    let r = b.sh("rc", "rm f*");
    assert_eq!(counts(&r), (0, 0, 150), "{r:#}");
    assert_eq!(r["receipt"]["changes"]["truncated"], true, "{r:#}");

    // RLIMIT_FSIZE ends a command that writes past file_size_max.
    let r = b.sh("rc", "exec head -c 2000000 /dev/urandom > big");
    assert_eq!(r["receipt"]["ended_by"], "file_size_max", "{r:#}");
    assert_eq!(r["receipt"]["changes"]["created"][0]["size"], 1 << 20, "{r:#}");
    // Neighbour: within the limit the same command ends on its own.
    let r = b.sh("rc", "exec head -c 1000 /dev/urandom > big");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert!(r["receipt"]["ended_by"].is_null(), "{r:#}");
    assert_eq!(paths(&r, "modified"), ["big"], "{r:#}");

    // Peak memory and CPU of a tool that allocates and touches 64 MiB.
    let r = b.exec("rc", &["python3", "-c", "b = b'x' * (64 << 20); print(len(b))"]);
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    let peak = r["receipt"]["memory_peak_bytes"].as_u64().unwrap_or(0);
    assert!(peak >= 64 << 20, "peak {peak} below what the tool touched: {r:#}");
    let source = r["receipt"]["memory_peak_source"].as_str().unwrap();
    assert!(["cgroup:memory.peak", "cgroup:memory.max_usage_in_bytes", "rusage:maxrss"].contains(&source), "{r:#}");
    eprintln!("peak memory {peak} bytes from {source} (unit: {})", b.is_unit());
    if !b.is_unit() {
        assert_eq!(source, "rusage:maxrss", "no scope, no cgroup figure: {r:#}");
    }
    assert!(r["receipt"]["cpu_ms"].as_f64().unwrap() > 0.0, "{r:#}");

    // A workflow with receipts off: no walk, no changes; the rest stays.
    let r = b.sh("rc-off", "echo x > a");
    assert_eq!(exit_code(&r), Some(0), "{r:#}");
    assert!(r["receipt"]["changes"].is_null(), "{r:#}");
    assert!(r["receipt"]["cpu_ms"].is_number(), "{r:#}");

    // `corral exec` prints one receipt line when the call changed files,
    // and none when it did not.
    let out = b.cli(None, &["exec", "rc", "--", "sh", "-c", "echo y > cli-made"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("corral: receipt: 1 created, 0 modified, 0 deleted"), "{err}");
    let out = b.cli(None, &["exec", "rc", "--", "cat", "cli-made"]);
    assert!(out.stderr.is_empty(), "{out:?}");

    // The ledger keeps the summary of each call.
    let row = poll(Duration::from_secs(10), || {
        b.ledger()
            .query_row(
                "SELECT created, modified, deleted, ended_by FROM exec_calls \
                 WHERE workflow = 'rc' AND argv LIKE '%rm gone%'",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<String>>(3)?)),
            )
            .ok()
    })
    .expect("the call's row in the ledger");
    assert_eq!(row, (2, 1, 1, None));
    let ended = poll(Duration::from_secs(10), || {
        b.ledger()
            .query_row("SELECT ended_by FROM exec_calls WHERE argv LIKE '%2000000%'", [], |r| r.get::<_, String>(0))
            .ok()
    });
    assert_eq!(ended.as_deref(), Some("file_size_max"));
}
