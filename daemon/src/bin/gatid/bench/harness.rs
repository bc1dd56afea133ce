//! Shared benchmark pieces: a gatid child process on a private socket, medians, JSON output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use gatid::client::Client;

/// A `gatid serve` child process on a private socket.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `gatid serve` with `config`, its socket moved into a private
    /// directory, and waits until it answers pings.
    pub fn start(config: &Path) -> anyhow::Result<Self> {
        Self::start_with(config, |_| {})
    }

    /// Like [`Self::start`], letting `tweak` edit the config table first.
    pub fn start_with(config: &Path, tweak: impl FnOnce(&mut toml::Table)) -> anyhow::Result<Self> {
        let dir = super::serving::tempdir()?;
        let socket = dir.join("gatid.sock");
        let text = std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
        let mut table: toml::Table = toml::from_str(&text)?;
        let base = config.parent().map(Path::to_path_buf).unwrap_or_default().canonicalize()?;
        let server = table.entry("server").or_insert_with(|| toml::Value::Table(Default::default()));
        if let toml::Value::Table(s) = server {
            s.insert("socket".into(), toml::Value::String(socket.display().to_string()));
        }
        table.remove("metrics");
        tweak(&mut table);
        if let Some(toml::Value::Array(models)) = table.get_mut("models") {
            for m in models {
                if let Some(toml::Value::String(p)) = m.get_mut("path") {
                    *p = base.join(&*p).display().to_string();
                }
            }
        }
        if let Some(toml::Value::Array(functions)) = table.get_mut("functions") {
            for f in functions {
                if let Some(toml::Value::String(p)) = f.get_mut("program") {
                    *p = base.join(&*p).display().to_string();
                }
            }
        }
        if let Some(toml::Value::Table(rt)) = table.get_mut("runtime") {
            if let Some(toml::Value::String(p)) = rt.get_mut("ort_library") {
                *p = base.join(&*p).display().to_string();
            }
        }
        let cfg_path = dir.join("gatid.toml");
        std::fs::write(&cfg_path, toml::to_string(&table)?)?;
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&cfg_path)
            .env("GATI_LOG", std::env::var("GATI_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .context("starting gatid")?;
        let mut d = Self { child, socket, dir };
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = d.child.try_wait()? {
                bail!("gatid exited during start-up: {status}");
            }
            if let Ok(mut c) = Client::connect(&d.socket) {
                if c.ping().is_ok() {
                    return Ok(d);
                }
            }
            if Instant::now() > until {
                bail!("gatid did not come up within 120 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new client connection.
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.socket)?)
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        let _ = std::fs::remove_dir_all(&self.dir);
        if !status.success() {
            bail!("gatid exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median in microseconds.
pub fn median_us(samples: &[Duration]) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Writes pretty JSON, creating the directory.
pub fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")?;
    Ok(())
}
