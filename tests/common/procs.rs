//! What the fault tests look up about processes in /proc: a daemon's
//! descendants, its sandboxes (by cgroup), resident memory.

use std::collections::HashMap;

/// Pids of the processes descended from `ancestor` whose arguments after
/// argv[0] are `args` (a function's sandboxes).
pub fn descendants_running(ancestor: u32, args: &[&str]) -> Vec<i32> {
    let mut parent = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let descends = |mut pid: i32| {
        for _ in 0..64 {
            match parent.get(&pid) {
                Some(&p) if p == ancestor as i32 => return true,
                Some(&p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    let mut found: Vec<i32> = parent
        .keys()
        .copied()
        .filter(|&pid| descends(pid))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<String> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into())
                .collect();
            argv.len() == args.len() + 1 && argv[1..].iter().zip(args).all(|(a, b)| a == b)
        })
        .collect();
    found.sort_unstable();
    found
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Pids of the processes in a sandbox cgroup of daemon `pid` (named
/// `<function>-<daemon pid>-<serial>` by the sandbox module).
pub fn jailed_by(pid: u32) -> Vec<i32> {
    let tag = format!("-{pid}-");
    let mut found: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| {
            let groups = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
            groups.lines().any(|l| l.contains("/gati/") && l.contains(&tag))
        })
        .collect();
    found.sort_unstable();
    found
}
