//! Build steps of the daemon crate.
//!
//! 1. Marks a build made without root as `gati_unprivileged`, so the system tests
//!    that need root (namespaces, cgroups, another uid, BPF) are compiled as ignored,
//!    with the reason, instead of passing without running:
//!    `#[cfg_attr(gati_unprivileged, ignore = "needs root: ...")]`.
//!    A target directory belongs to the user who builds in it, so the flag
//!    follows the user who runs the tests; CI builds and runs as root.
//! 2. Compiles the eBPF steering programs (`../ebpf/*.bpf.c`) with `clang -target bpf`
//!    (`$GATI_CLANG`, else `clang`) into `$OUT_DIR/steer.bpf.o`, embedded by
//!    `steer::program`. Without clang the object is empty, a warning says so,
//!    and `GATI_BPF_BUILD` tells the daemon why kernel steering is unavailable;
//!    `gati_no_bpf` marks such a build (its kernel-steering tests show as ignored).
//!    The GPU device program (`../ebpf/devices.bpf.c`, cgroup v2) likewise goes to
//!    `$OUT_DIR/devices.bpf.o`, embedded by `auction::devices::v2`; `GATI_DEV_BPF_BUILD`
//!    says why it is unavailable when it is empty.
//! 3. Compiles and runs `../ebpf/layout.c` on the host (the C compiler Rust links
//!    with) to write `$OUT_DIR/steer_layout.rs`: the header's sizes, offsets and
//!    constants, which a unit test compares with the `#[repr(C)]` mirrors (and
//!    `$OUT_DIR/devices_layout.rs`, the same for `../ebpf/devices.h`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gati_unprivileged)");
    println!("cargo::rerun-if-changed=build.rs");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc_geteuid() };
    if euid != 0 {
        println!("cargo::rustc-cfg=gati_unprivileged");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    for f in ["steer.h", "steer_common.h", "steer.bpf.c", "layout.c", "devices.h", "devices.bpf.c"] {
        println!("cargo::rerun-if-changed={}", ebpf.join(f).display());
    }
    println!("cargo::rerun-if-env-changed=GATI_CLANG");
    let status = compile_bpf(&ebpf, "steer.bpf.c", &out.join("steer.bpf.o"), "kernel steering");
    println!("cargo::rustc-env=GATI_BPF_BUILD={status}");
    let dev = compile_bpf(&ebpf, "devices.bpf.c", &out.join("devices.bpf.o"), "cgroup-v2 GPU device rules");
    println!("cargo::rustc-env=GATI_DEV_BPF_BUILD={dev}");
    // Kernel-steering tests are compiled as ignored, with the reason, in such builds.
    println!("cargo::rustc-check-cfg=cfg(gati_no_bpf)");
    if status != "ok" {
        println!("cargo::rustc-cfg=gati_no_bpf");
    }
    layout(&ebpf, &out);
}

/// `ok`, or why the object is empty.
fn compile_bpf(ebpf: &Path, src: &str, obj: &Path, what: &str) -> String {
    let clang = std::env::var("GATI_CLANG").unwrap_or_else(|_| "clang".into());
    let run = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-I"])
        .arg(ebpf)
        .arg("-c")
        .arg(ebpf.join(src))
        .arg("-o")
        .arg(obj)
        .output();
    let why = match run {
        Ok(o) if o.status.success() => return "ok".into(),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            format!("clang failed on ebpf/{src}: {}", err.lines().next().unwrap_or("").trim())
        }
        Err(_) => "built without clang".into(),
    };
    println!("cargo::warning={what} unavailable: {why} (install clang and libbpf-dev: scripts/setup.sh)");
    std::fs::write(obj, b"").expect("write empty BPF object");
    why.replace(['\n', '\r'], " ")
}

/// Writes `steer_layout.rs` and sets `gati_steer_layout` (empty and unset when no C compiler).
fn layout(ebpf: &Path, out: &Path) {
    let exe = out.join("steer_layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc).arg("-I").arg(ebpf).arg(ebpf.join("layout.c")).arg("-o").arg(&exe).status();
    let run = |arg: &str| match &built {
        Ok(s) if s.success() => match Command::new(&exe).arg(arg).output() {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    let text = run("steer");
    std::fs::write(out.join("devices_layout.rs"), run("devices")).expect("write devices_layout.rs");
    println!("cargo::rustc-check-cfg=cfg(gati_steer_layout)");
    if text.is_empty() {
        println!("cargo::warning=ebpf/layout.c could not be built with `{cc}`: the layout test is skipped");
    } else {
        println!("cargo::rustc-cfg=gati_steer_layout");
    }
    std::fs::write(out.join("steer_layout.rs"), text).expect("write steer_layout.rs");
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
