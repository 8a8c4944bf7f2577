//! Two link options for a smaller footprint (README, Footprint); where the
//! linker refuses one, the link is as before.
//!
//! - The executables' relative relocations are packed (`-z
//!   pack-relative-relocs`, `DT_RELR`) where the C library that loads them
//!   understands the packed form: glibc 2.36 or later. The broker and every
//!   worker read them at each start; packed they are a few KiB instead of
//!   0.3 MB, and the binary is that much smaller. Not for an older glibc,
//!   musl or a cross build. `CORRAL_NO_RELR=1` turns it off.
//! - The functions a worker runs, then those an idle broker runs, come
//!   first in the code (`build/code-order.ld`, a linker script that adds
//!   two output sections in front of `.text`), so that each maps a few
//!   hundred KiB of the binary's code rather than most of it.
//!   `CORRAL_NO_CODE_ORDER=1` turns it off.

use std::io::Write;
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CORRAL_NO_RELR");
    println!("cargo:rerun-if-env-changed=CORRAL_NO_CODE_ORDER");
    println!("cargo:rerun-if-changed={CODE_ORDER}");
    let var = |name| std::env::var(name).unwrap_or_default();
    let (target, host, linker) = (var("TARGET"), var("HOST"), var("RUSTC_LINKER"));
    // The probes link for this machine: a cross build links as before.
    if target != host || !target.contains("-linux-") {
        return;
    }
    let script = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join(CODE_ORDER);
    if std::env::var_os("CORRAL_NO_CODE_ORDER").is_none()
        && links(&linker, "code-order-probe", &format!("-Wl,-T,{}", script.display()))
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
    if std::env::var_os("CORRAL_NO_RELR").is_none()
        && target.ends_with("-linux-gnu")
        && glibc_version().is_some_and(|v| v >= (2, 36))
        && links(&linker, "relr-probe", "-Wl,-z,pack-relative-relocs")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The worker's and the broker's functions, gathered
/// (scripts/code-order/order.sh).
const CODE_ORDER: &str = "build/code-order.ld";

/// This machine's glibc, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn glibc_version() -> Option<(u32, u32)> {
    let out = Command::new("getconf").arg("GNU_LIBC_VERSION").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let (major, rest) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    Some((major.parse().ok()?, rest.split('.').next()?.parse().ok()?))
}

/// Whether the linker links a program with `arg` and no warning (an
/// older GNU ld ignores an unknown `-z` keyword with a warning).
fn links(linker: &str, name: &str, arg: &str) -> bool {
    let cc = if linker.is_empty() { "cc" } else { linker };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join(name);
    let child = Command::new(cc)
        .args(["-x", "c", "-", "-o"])
        .arg(&out)
        // --fatal-warnings first: GNU ld reports an unknown -z keyword
        // while it reads the options, before a later one could take effect.
        .args(["-Wl,--fatal-warnings", arg])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"int main(void) { return 0; }\n");
    }
    child.wait().is_ok_and(|s| s.success())
}
