//! Packs the executables' relative relocations (`-z pack-relative-relocs`,
//! `DT_RELR`) where the C library that loads them understands the packed
//! form: glibc 2.36 or later. The broker and every worker read them at each
//! start; packed they are a few KiB instead of 0.3 MB, and the binary is
//! that much smaller (README, Footprint). Elsewhere (an older glibc, musl, a
//! cross build, a linker without the option) the link is as before.
//! `CORRAL_NO_RELR=1` turns it off.

use std::io::Write;
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CORRAL_NO_RELR");
    let var = |name| std::env::var(name).unwrap_or_default();
    let (target, host) = (var("TARGET"), var("HOST"));
    if target != host || !target.ends_with("-linux-gnu") || std::env::var_os("CORRAL_NO_RELR").is_some() {
        return;
    }
    if glibc_version().is_some_and(|v| v >= (2, 36)) && linker_takes_relr(&var("RUSTC_LINKER")) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// This machine's glibc, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn glibc_version() -> Option<(u32, u32)> {
    let out = Command::new("getconf").arg("GNU_LIBC_VERSION").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let (major, rest) = text.trim().strip_prefix("glibc ")?.split_once('.')?;
    Some((major.parse().ok()?, rest.split('.').next()?.parse().ok()?))
}

/// Whether the linker links a program with the option and no warning (an
/// older GNU ld ignores an unknown `-z` keyword with a warning).
fn linker_takes_relr(linker: &str) -> bool {
    let cc = if linker.is_empty() { "cc" } else { linker };
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("relr-probe");
    let child = Command::new(cc)
        .args(["-x", "c", "-", "-o"])
        .arg(&out)
        // --fatal-warnings first: GNU ld reports an unknown -z keyword
        // while it reads the options, before a later one could take effect.
        .args(["-Wl,--fatal-warnings", "-Wl,-z,pack-relative-relocs"])
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
