//! Typed configuration: what the operator writes in the TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::dag::{DagConfig, FunctionConfig};

/// The whole node configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// DAG functions: model functions and exec programs.
    #[serde(default)]
    pub functions: Vec<FunctionConfig>,
    /// DAG deployments over `functions`.
    #[serde(default)]
    pub dags: Vec<DagConfig>,
    /// The DAG scheduler's policy (gati's, or the benchmark baseline).
    #[serde(default)]
    pub dispatch: super::DispatchConfig,
    /// How DAG requests are steered to SGSs (eBPF or userspace).
    #[serde(default)]
    pub steer: super::SteerConfig,
    /// Cluster-wide GPU auctions (`[cluster]`); none: the node runs alone.
    #[serde(default)]
    pub cluster: Option<super::ClusterConfig>,
}

/// The Unix socket listener and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Path of the Unix stream socket (ignored when systemd passes a socket).
    pub socket: PathBuf,
    /// File mode of the socket, octal string.
    pub socket_mode: String,
    /// Peer uids allowed to connect (SO_PEERCRED). Empty with `allow_gids` empty: any peer
    /// that can open the socket file.
    pub allow_uids: Vec<u32>,
    /// Peer gids allowed to connect.
    pub allow_gids: Vec<u32>,
    /// Data-plane threads, each with its own io_uring ring.
    pub io_threads: usize,
    /// Largest accepted frame payload, bytes.
    pub max_frame_bytes: u32,
    /// Requests a connection may have in flight before `Busy` answers.
    pub max_inflight_per_conn: u32,
    /// Open connections before new ones are refused.
    pub max_connections: u32,
    /// Node-wide budget for request bytes held in memory (payloads being
    /// received, decoded inputs queued, answers waiting for slow readers);
    /// a request that does not fit is answered `Busy` at once.
    pub max_queued_bytes: u64,
    /// How long SIGTERM waits for in-flight work before exiting.
    pub drain_timeout_ms: u64,
    /// After handling traffic, an I/O thread polls its ring this long before
    /// sleeping: lower round-trip latency for chatty clients, for some CPU. 0 = off.
    pub busy_poll_us: u64,
    /// UDP ingress address (`"127.0.0.1:PORT"`), one request per datagram; off when unset.
    pub udp: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/gati/gatid.sock"),
            socket_mode: "0660".into(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            io_threads: 1,
            max_frame_bytes: 16 << 20,
            max_inflight_per_conn: 256,
            max_connections: 1024,
            max_queued_bytes: 256 << 20,
            drain_timeout_ms: 10_000,
            busy_poll_us: 0,
            udp: None,
        }
    }
}

/// Where ONNX Runtime comes from.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so.*`; falls back to `ORT_DYLIB_PATH`.
    pub ort_library: Option<PathBuf>,
    /// Where state that outlives a restart goes (cache state under `caches/`);
    /// falls back to `$STATE_DIRECTORY` (systemd's `StateDirectory=`); neither:
    /// nothing is persisted.
    pub state_dir: Option<PathBuf>,
}

/// Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Loopback address for the Prometheus text endpoint; none = not served over HTTP
    /// (still available through `gatictl stats`).
    pub listen: Option<SocketAddr>,
}

/// Where a model is cut into stages.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Cuts {
    /// `"auto"` (after each detected top-level block) or `"none"` (one stage).
    Mode(String),
    /// Named tensors, in graph order.
    Tensors(Vec<String>),
}

impl Default for Cuts {
    fn default() -> Self {
        Self::Mode("auto".into())
    }
}

/// What the model's output tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    #[default]
    Logits,
    Probabilities,
}

/// Memory layout of the model's image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Layout {
    #[default]
    NCHW,
    NHWC,
}

/// Resampling used when an image does not have the model's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    #[default]
    Bilinear,
    Nearest,
    /// Images of another size are refused with `BadShape`.
    None,
}

/// How raw u8 HWC images become the model's input tensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub layout: Layout,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Multiplies each pixel (e.g. 1/255) before mean/std.
    #[serde(default = "one")]
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (empty = 0).
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Per-channel std dividing after the mean (empty = 1).
    #[serde(default)]
    pub std: Vec<f32>,
    #[serde(default)]
    pub resize: Resize,
}

fn one() -> f32 {
    1.0
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub cuts: Cuts,
    pub input: InputConfig,
    #[serde(default)]
    pub output: OutputKind,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Largest batch the batcher forms, in rows.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long the batcher waits for more rows after the first, microseconds.
    #[serde(default)]
    pub max_queue_delay_us: u64,
    /// Rows that may wait in the model's queue before requests are answered
    /// `Busy`; default 64 × `max_batch`.
    #[serde(default)]
    pub max_queue_rows: Option<usize>,
    /// ONNX Runtime intra-op threads per stage session.
    #[serde(default = "default_threads")]
    pub intra_threads: usize,
    /// Caches after hidden layers; none by default.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Executor: `cpu` (ONNX Runtime, default) or `cuda` (gati's GPU executor).
    #[serde(default)]
    pub backend: super::Backend,
    /// CUDA device ordinal (`backend = "cuda"`).
    #[serde(default)]
    pub device: usize,
    /// A `cuda` model on a node that cannot run it: fail its load (`none`,
    /// default) or serve it on the CPU (`cpu`).
    #[serde(default)]
    pub fallback: super::Fallback,
}

/// Which cache answers at the cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheKind {
    /// A small trained predictor per cut (GATI).
    Learned,
    /// k nearest neighbours over reduced activations (Freeze Inference).
    Knn,
    /// Nearest k-means centroid (Freeze Inference).
    Kmeans,
}

/// How a learned cache says how sure it is of a guess.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSelector {
    /// The predicted class's probability (max-softmax).
    #[default]
    Softmax,
    /// Also logistic regressions trained on whether the predictor agreed with
    /// the full model (from its output; from its output, guess and the cut's
    /// features): per cut the placement keeps whichever certifies more.
    Learned,
}

/// Cache settings of one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub kind: CacheKind,
    /// Confidence of a `learned` cache: max-softmax or a learned selector.
    #[serde(default)]
    pub selector: CacheSelector,
    /// Largest allowed disagreement with the full model (fraction of requests).
    #[serde(default = "default_budget")]
    pub budget: f32,
    /// Recent full-model answers kept for training (rows).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Rows needed before the first training.
    #[serde(default = "default_min_samples")]
    pub min_samples: usize,
    /// New rows between retrainings.
    #[serde(default = "default_min_samples")]
    pub retrain_every: usize,
    /// Fraction of cache hits also run through the full model to measure live
    /// disagreement (off the request path: the hit is answered first).
    #[serde(default = "default_shadow")]
    pub shadow_fraction: f32,
    /// Largest share of one core the background trainer may use.
    #[serde(default = "default_trainer_share")]
    pub trainer_cpu_share: f32,
    /// Hidden units of the larger learned predictor the placement optimizer may
    /// pick per cut (it also tries softmax regression); 0 = regression only.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Most bytes all of the model's active caches may hold together.
    #[serde(default = "default_cache_memory")]
    pub max_memory_bytes: usize,
    /// Give every cut the model's previous answer on the same connection as extra
    /// features (temporal locality of a stream; learned weights ignore it when it
    /// does not help).
    #[serde(default = "default_true")]
    pub stream_prior: bool,
    /// Where this model's cache state is saved (`<state_dir>/caches/<model>.bin`);
    /// set from `[runtime] state_dir` at load, not written by the operator.
    #[serde(skip)]
    pub state_file: Option<PathBuf>,
}

fn default_hidden() -> usize {
    32
}

fn default_cache_memory() -> usize {
    16 << 20
}

fn default_true() -> bool {
    true
}

fn default_trainer_share() -> f32 {
    0.5
}

fn default_budget() -> f32 {
    0.01
}

fn default_window() -> usize {
    4096
}

fn default_min_samples() -> usize {
    256
}

fn default_shadow() -> f32 {
    0.05
}

fn default_max_batch() -> usize {
    32
}

fn default_threads() -> usize {
    1
}
