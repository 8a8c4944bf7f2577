//! Pool behaviour that is not about escapes or limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn idle_worker_that_dies_is_replaced_before_the_next_call() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("idle-death", &shipped_policies());
    let old = b.worker_pids("shell-tools");
    assert_eq!(old.len(), 1, "one idle worker: {old:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(b.host_pid(old[0])).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The broker notices the death on its own: a new worker appears and is
    // idle without any call having failed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = b.status();
        let wf = st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == "shell-tools").unwrap().clone();
        let w = &wf["workers"][0];
        let replaced = w["pid"].as_u64().is_some_and(|p| p != u64::from(old[0])) && w["state"] == "idle";
        if replaced {
            assert!(w["restarts"].as_u64().unwrap() >= 1, "{w:#}");
            assert!(w["last_exit"].as_str().unwrap().contains("idle worker killed by signal 9"), "{w:#}");
            assert!(w["start_ms"].as_f64().unwrap() > 0.0, "{w:#}");
            break;
        }
        assert!(Instant::now() < deadline, "idle worker not replaced: {wf:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first call after the death succeeds.
    let r = b.exec("shell-tools", &["echo", "ok"]);
    assert_eq!(stdout(&r), "ok\n", "{r:#}");
}
