//! Shared pieces of the system tests: real models, real `gatid` processes on
//! private sockets, and ONNX Runtime called directly as the reference.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatid::client::Client;

pub mod procs;
pub mod steer;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn ort_lib() -> PathBuf {
    let p = root().join(".venv/libonnxruntime.so");
    assert!(p.exists(), "{} missing: run scripts/setup.sh first", p.display());
    p
}

pub fn model_path(file: &str) -> PathBuf {
    let p = root().join("models").join(file);
    assert!(p.exists(), "{} missing: run scripts/setup.sh first", p.display());
    p
}

/// ONNX Runtime in this test process, from the same library the daemon loads.
pub fn ort_env() {
    gatid::infer::runtime::environment(Some(&ort_lib())).expect("load ONNX Runtime");
}

pub fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "gati-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub const CIFAR_LABELS: &str =
    r#"["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]"#;

/// A `[[models]]` entry for the CIFAR-10 CNN.
pub fn cifar_model(name: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\nlabels = {CIFAR_LABELS}\n{extra}\ninput = {{ layout = \"NHWC\", height = 32, width = 32, channels = 3 }}\n",
        model_path("cifar10_cnn.onnx").display()
    )
}

/// A `[[models]]` entry for the Fashion-MNIST ResNet.
pub fn fmnist_model(name: &str, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\n{extra}\ninput = {{ layout = \"NCHW\", height = 28, width = 28, channels = 1, scale = 0.00392156862745098, mean = [0.2860], std = [0.3530] }}\n",
        model_path("fmnist_resnet.onnx").display()
    )
}

/// A config text with the socket in `dir`.
pub fn config(dir: &Path, server_extra: &str, models: &[String]) -> String {
    format!(
        "[server]\nsocket = \"{}\"\n{server_extra}\n[runtime]\nort_library = \"{}\"\n\n{}",
        dir.join("gatid.sock").display(),
        ort_lib().display(),
        models.join("\n")
    )
}

/// A running `gatid serve`.
pub struct TestDaemon {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl TestDaemon {
    /// Writes `config_text` to `dir` and starts the daemon; waits until it answers.
    pub fn start(dir: &Path, config_text: &str) -> Self {
        Self::start_with(dir, config_text, |_| {})
    }

    pub fn start_with(dir: &Path, config_text: &str, tweak: impl FnOnce(&mut Command)) -> Self {
        Self::start_wrapped(dir, config_text, &[], tweak)
    }

    /// As [`TestDaemon::start_with`], with `gatid` run by the command `wrapper`
    /// (e.g. `unshare -m sh -c '…; exec "$@"' sh`), which must `exec` it so
    /// that the child's pid is the daemon's.
    pub fn start_wrapped(dir: &Path, config_text: &str, wrapper: &[&str], tweak: impl FnOnce(&mut Command)) -> Self {
        let config = dir.join("gatid.toml");
        std::fs::write(&config, config_text).unwrap();
        let gatid = env!("CARGO_BIN_EXE_gatid");
        let mut cmd = match wrapper {
            [] => Command::new(gatid),
            [program, args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(gatid);
                cmd
            }
        };
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("GATI_LOG", std::env::var("GATI_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        tweak(&mut cmd);
        let child = cmd.spawn().expect("spawn gatid");
        let mut d = Self { child, dir: dir.to_owned(), socket: dir.join("gatid.sock"), config };
        d.wait_ready();
        d
    }

    /// Starts the daemon and returns at once, before it answers.
    pub fn spawn(dir: &Path, config_text: &str) -> Self {
        let config = dir.join("gatid.toml");
        std::fs::write(&config, config_text).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gatid"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("GATI_LOG", std::env::var("GATI_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn gatid");
        Self { child, dir: dir.to_owned(), socket: dir.join("gatid.sock"), config }
    }

    /// Waits (bounded) until the daemon answers a ping; panics if it exits first.
    pub fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("gatid exited during start-up: {st}");
            }
            if let Ok(mut c) = Client::connect(&self.socket) {
                if c.ping().is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < until, "gatid did not come up in 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for exit (bounded).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < until, "gatid did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until the text file at `path` (a daemon's stderr, say)
/// contains `needle`; returns the whole text.
pub fn wait_for_text(path: &Path, needle: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < until, "no `{needle}` in {} within {within:?}; it has:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fake `NOTIFY_SOCKET` collecting sd_notify messages.
pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Self { path, sock }
    }

    /// Waits for a message containing `needle`; returns it.
    pub fn expect(&self, needle: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while Instant::now() < until {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                    return msg;
                }
                seen.push(msg);
            }
        }
        panic!("no `{needle}` notification within {within:?}; saw {seen:?}")
    }

    /// Every message received until `until`.
    pub fn until(&self, until: Instant) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while Instant::now() < until {
            if let Ok(n) = self.sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen
    }
}

/// The 20 CIFAR-10 test images: (RGB pixels HWC, label).
pub fn cifar_images() -> Vec<(Vec<u8>, usize)> {
    let dir = root().join("data/cifar10");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/setup.sh", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap();
            let label: usize = stem.rsplit('_').next().unwrap().parse().unwrap();
            let img = image::open(p).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (32, 32));
            (img.into_raw(), label)
        })
        .collect()
}

/// The first `n` Fashion-MNIST test images (28×28 u8) and labels.
pub fn fmnist_test(n: usize) -> Vec<(Vec<u8>, usize)> {
    let d = root().join("data/fashion-mnist");
    let mut images = Vec::new();
    std::fs::File::open(d.join("t10k-images-idx3-ubyte"))
        .expect("run scripts/setup.sh")
        .read_to_end(&mut images)
        .unwrap();
    let labels = std::fs::read(d.join("t10k-labels-idx1-ubyte")).unwrap();
    (0..n).map(|i| (images[16 + i * 784..16 + (i + 1) * 784].to_vec(), usize::from(labels[8 + i]))).collect()
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap()
}

/// Runs a whole ONNX model in-process on f32 input of `shape`.
pub fn ort_direct(model: &Path, shape: &[usize], data: &[f32]) -> Vec<f32> {
    ort_env();
    let bytes = std::fs::read(model).unwrap();
    let mut s = gatid::infer::pipeline::session_from_bytes(&bytes, 1, "reference").unwrap();
    let t = ort::value::TensorRef::from_array_view((shape.to_vec(), data)).unwrap();
    let out = s.run(ort::inputs![t]).unwrap();
    out[0].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Root-only tests carry `#[cfg_attr(gati_unprivileged, ignore = "needs root: ...")]`
/// (set by daemon/build.rs for builds without root), so they show as ignored with
/// the reason; a stale build run without root fails here instead of passing unrun.
pub fn require_root() {
    assert!(is_root(), "this test needs root; rebuild as the user who runs it");
}

/// A gauge or counter of `model` from the daemon's metrics text (0 when absent).
pub fn model_metric(c: &mut Client, name: &str, model: &str) -> f64 {
    gatid::telemetry::summary::model_value(&c.stats_text().unwrap(), name, model).unwrap_or(0.0)
}

/// Waits (up to 60 s) until `model`'s caches have been trained at least `generation` times.
pub fn wait_cache_generation(c: &mut Client, model: &str, generation: u64) {
    let trained =
        gatid::client::calibrate::wait_trained(c, model, generation.saturating_sub(1), Duration::from_secs(60));
    assert!(trained.unwrap(), "caches of {model} not trained {generation} times within 60 s");
}

/// The Fashion-MNIST model's input settings (as in `fmnist_model`).
pub fn fmnist_input() -> gatid::config::InputConfig {
    gatid::config::InputConfig {
        layout: gatid::config::Layout::NCHW,
        height: 28,
        width: 28,
        channels: 1,
        scale: 1.0 / 255.0,
        mean: vec![0.2860],
        std: vec![0.3530],
        resize: gatid::config::Resize::Bilinear,
    }
}

/// An sdk function binary (`gati-fn-*`) next to this test's target dir
/// (`<target>/<profile>/`). `cargo test -p gatid` does not rebuild another
/// package's binaries: a missing one, or one older than its sources, fails here
/// with the command that builds it.
pub fn sdk_program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target profile dir");
    let path = dir.join(name);
    let hint = "build the sdk's function binaries first: cargo build --release -p gati-sdk";
    let built = std::fs::metadata(&path).and_then(|m| m.modified());
    let built = built.unwrap_or_else(|_| panic!("{} is missing: {hint}", path.display()));
    let sources = root().join("sdk/src");
    let mut newest = std::fs::metadata(sources.join("bin").join(format!("{name}.rs"))).and_then(|m| m.modified()).ok();
    for entry in std::fs::read_dir(&sources).into_iter().flatten().flatten() {
        if entry.path().is_file() {
            newest = newest.max(entry.metadata().and_then(|m| m.modified()).ok());
        }
    }
    if let Some(newest) = newest {
        assert!(built >= newest, "{} is older than its sources: {hint}", path.display());
    }
    path
}

/// A `[[functions]]` entry running sdk program `prog` in a sandbox.
pub fn exec_function(name: &str, prog: &str, args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[functions]]\nname = \"{name}\"\nkind = \"exec\"\nprogram = \"{}\"\nargs = [{}]\n{extra}\n",
        sdk_program(prog).display(),
        args.join(", ")
    )
}

/// An unlabelled counter or gauge from metrics text (0 when absent).
pub fn plain_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (bounded) until the unlabelled metric `name` reaches `at_least`.
pub fn wait_metric(c: &mut Client, name: &str, at_least: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v = plain_metric(&c.stats_text().unwrap(), name);
        if v >= at_least {
            return v;
        }
        assert!(Instant::now() < until, "{name} = {v}, want ≥ {at_least} within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends the first `n` Fashion-MNIST calibration images to `fmnist` and waits
/// for the training they trigger.
pub fn warm_start_fmnist(c: &mut Client, n: usize) {
    use gatid::client::calibrate;
    let mut set = calibrate::read(&root().join("data/fashion-mnist/calib-images-idx3-ubyte"), [28, 28, 1])
        .expect("run scripts/setup.sh");
    set.images.truncate(n);
    assert_eq!(calibrate::send(c, "fmnist", &set, 16, |_| {}).unwrap(), n);
    let v = c.control_json(gatid::api::wire::Kind::CacheTrain, gatid::api::wire::model_id("fmnist"), &[]).unwrap();
    assert!(v["window_rows"].as_u64().unwrap() >= v["rows_needed"].as_u64().unwrap(), "{v}");
    wait_cache_generation(c, "fmnist", v["generation"].as_u64().unwrap() + 1);
}

/// `fmnist`'s (exit stage, class) for each image.
pub fn fmnist_answers(c: &mut Client, images: &[(Vec<u8>, usize)]) -> Vec<(u16, usize)> {
    images
        .iter()
        .map(|(px, _)| {
            let r = c.infer("fmnist", gatid::api::wire::Dtype::U8, &[28, 28, 1], px, 0).unwrap().ok().unwrap();
            (r.exit_stage, argmax(&r.floats()))
        })
        .collect()
}

/// `text` with `[runtime] state_dir` set to `state`.
pub fn with_state_dir(text: &str, state: &Path) -> String {
    text.replace("[runtime]\n", &format!("[runtime]\nstate_dir = \"{}\"\n", state.display()))
}

/// Starts a new daemon on the caches saved in `state` and checks they were
/// restored as they were: same generation, and every answer (exit cut and
/// class) of `test` the same as `before`.
pub fn assert_restored_caches(
    tag: &str,
    state: &Path,
    cache: &str,
    generation: f64,
    test: &[(Vec<u8>, usize)],
    before: &[(u16, usize)],
) {
    let dir = tempdir(tag);
    let d = TestDaemon::start(&dir, &with_state_dir(&config(&dir, "", &[fmnist_model("fmnist", cache)]), state));
    let mut c = d.client();
    assert_eq!(model_metric(&mut c, "gati_cache_generation", "fmnist"), generation, "restored, not retrained");
    assert_eq!(fmnist_answers(&mut c, test), before, "every answer (exit cut and class) is the same after the restart");
}

/// A free loopback TCP address (bound, then released).
pub fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The config of node `id` of a loopback cluster with a static arbiter
/// (node 1, at `addrs[0]`; node `id` listens at `addrs[id - 1]`, the others
/// are its peers); `cluster` adds `[cluster]` keys (gpus, lease_s, …).
pub fn static_cluster_config(dir: &Path, key: &Path, id: u32, addrs: &[std::net::SocketAddr], cluster: &str) -> String {
    let me = addrs[id as usize - 1];
    let peers: Vec<String> = addrs.iter().filter(|a| **a != me).map(|a| format!("\"{a}\"")).collect();
    format!(
        "{}\n[cluster]\nnode_id = {id}\nlisten = \"{me}\"\nkey_file = \"{}\"\npeers = [{}]\narbiter = \"{}\"\n{cluster}",
        config(dir, "", &[]),
        key.display(),
        peers.join(", "),
        addrs[0]
    )
}

/// Every lease in a node's view, checked: no GPU in two leases.
pub fn leases_checked(view: &serde_json::Value, who: &str) -> Vec<(u64, Vec<(u64, u64)>)> {
    assert_eq!(view["conflicts"], 0, "{who}: a grant clashed with a lease it saw: {view}");
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for l in view["leases"].as_array().unwrap() {
        let gpus: Vec<(u64, u64)> = l["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["node"].as_u64().unwrap(), g["index"].as_u64().unwrap()))
            .collect();
        for g in &gpus {
            assert!(seen.insert(*g), "{who}: GPU {g:?} leased twice: {view}");
        }
        out.push((l["app"].as_u64().unwrap(), gpus));
    }
    out
}
