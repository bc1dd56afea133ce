//! The `[steer]` section: how DAG requests find their SGS (docs/steering.md).

use serde::Deserialize;

/// Which routing table the load balancer writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SteerMode {
    /// eBPF when it loads, else the userspace table (the reason is logged and
    /// shown by `gatictl steer` and Health).
    #[default]
    Auto,
    /// eBPF or the daemon does not start.
    Ebpf,
    /// The userspace table only (every UDP datagram through the I/O thread).
    Userspace,
}

impl SteerMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Userspace => "userspace",
        }
    }
}

/// How Unix stream clients' DAG requests reach their SGS (`[steer] unix`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnixSteerMode {
    /// The `steer_unix` verdict redirects whole `InvokeDag` frames to the SGS's
    /// socket (when kernel steering is active; else as `userspace`).
    Kernel,
    /// The I/O thread reads every frame and routes it (`Lb::route`).
    #[default]
    Userspace,
}

/// `[steer]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SteerConfig {
    pub mode: SteerMode,
    pub unix: UnixSteerMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_default_to_auto() {
        #[derive(Deserialize)]
        struct W {
            #[serde(default)]
            steer: SteerConfig,
        }
        let w: W = toml::from_str("").unwrap();
        assert_eq!(w.steer.mode, SteerMode::Auto);
        let w: W = toml::from_str("[steer]\nmode = \"userspace\"").unwrap();
        assert_eq!(w.steer.mode, SteerMode::Userspace);
        assert!(toml::from_str::<W>("[steer]\nmode = \"xdp\"").is_err());
    }
}
