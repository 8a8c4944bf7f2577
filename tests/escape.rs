//! The escape suite: each case asserts that an attack from inside a tool call
//! fails *and* that its legitimate neighbour succeeds, so a setup that denies
//! everything cannot pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn reading_etc_shadow_fails_but_etc_passwd_works() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("shadow", &shipped_policies());
    let attack = b.exec("shell-tools", &["cat", "/etc/shadow"]);
    assert_ne!(exit_code(&attack), Some(0), "{attack:#}");
    assert!(stderr(&attack).contains("Permission denied"), "{attack:#}");
    assert!(!stdout(&attack).contains("root:"), "{attack:#}");
    let ok = b.exec("shell-tools", &["cat", "/etc/passwd"]);
    assert_eq!(exit_code(&ok), Some(0), "{ok:#}");
    assert!(stdout(&ok).contains("root:x:0:0"), "{ok:#}");
}
