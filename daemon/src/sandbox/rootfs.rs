//! What a function's private root contains: its program and the shared
//! libraries the program loads (found with `ldd` once per program and cached),
//! nothing else. The jail bind-mounts each file read-only at the same path
//! inside a fresh tmpfs, plus `/proc` for the function's own pid namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::SandboxError;

/// Where the program is placed inside the root.
pub const PROGRAM_DIR: &str = "/bin";

/// The files a function's root is built from.
#[derive(Debug)]
pub struct RootContents {
    /// The program on the host (canonical path).
    pub program: PathBuf,
    /// The program's path inside the root (`/bin/<file name>`).
    pub program_in_root: PathBuf,
    /// Libraries by the absolute path the loader opens (same inside and out).
    pub libs: Vec<PathBuf>,
}

impl RootContents {
    /// Every directory the root needs, parents first, without duplicates.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let files = std::iter::once(&self.program_in_root).chain(&self.libs);
        for file in files {
            let mut parents: Vec<&Path> = file.ancestors().skip(1).filter(|p| *p != Path::new("/")).collect();
            parents.reverse();
            for p in parents {
                if !dirs.iter().any(|d| d == p) {
                    dirs.push(p.to_path_buf());
                }
            }
        }
        dirs
    }
}

/// The root contents for `program`, from the cache while its mtime is unchanged.
pub fn contents(program: &Path) -> Result<Arc<RootContents>, SandboxError> {
    type Cache = Mutex<HashMap<PathBuf, (Option<SystemTime>, Arc<RootContents>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let program = program.canonicalize().map_err(|e| SandboxError::Program(format!("{}: {e}", program.display())))?;
    let mtime = program.metadata().and_then(|m| m.modified()).ok();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((seen, found)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&program) {
        if *seen == mtime {
            return Ok(found.clone());
        }
    }
    let name =
        program.file_name().ok_or_else(|| SandboxError::Program(format!("{}: no file name", program.display())))?;
    let found = Arc::new(RootContents {
        program_in_root: Path::new(PROGRAM_DIR).join(name),
        libs: shared_libraries(&program)?,
        program: program.clone(),
    });
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(program, (mtime, found.clone()));
    Ok(found)
}

/// Runs `ldd` and parses the libraries it resolved (and the loader).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, SandboxError> {
    let out = Command::new("ldd")
        .arg(program)
        .env_clear()
        .output()
        .map_err(|e| SandboxError::Program(format!("running ldd on {}: {e}", program.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new()); // statically linked
        }
        return Err(SandboxError::Program(format!("ldd {} failed: {}", program.display(), text.trim())));
    }
    parse_ldd(&text).map_err(|msg| SandboxError::Program(format!("{}: {msg}", program.display())))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(format!("library {} not found", name.trim()));
                }
                target.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        // vdso lines have no path; everything else is absolute.
        if path.starts_with('/') && !libs.iter().any(|l: &PathBuf| l == Path::new(path)) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed_into_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f10)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f11)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
        let root = RootContents { program: "/x/f".into(), program_in_root: "/bin/f".into(), libs };
        let dirs: Vec<String> = root.dirs().iter().map(|d| d.display().to_string()).collect();
        assert_eq!(dirs, ["/bin", "/lib", "/lib/x86_64-linux-gnu", "/lib64"]);
    }
}
