//! Marks a build made without root as `gati_unprivileged`, so the system tests
//! that need root (namespaces, cgroups, another uid) are compiled as ignored,
//! with the reason, instead of passing without running:
//! `#[cfg_attr(gati_unprivileged, ignore = "needs root: ...")]`.
//! A target directory belongs to the user who builds in it, so the flag
//! follows the user who runs the tests; CI builds and runs as root.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(gati_unprivileged)");
    println!("cargo::rerun-if-changed=build.rs");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc_geteuid() };
    if euid != 0 {
        println!("cargo::rustc-cfg=gati_unprivileged");
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
