//! An open-loop load generator for DAG invocations: requests leave on their
//! scheduled time whether or not earlier answers came back, spread over
//! several connections, each with a sender and a receiver thread; answers
//! are matched by request id. Latency is measured from the *scheduled* send
//! time (no coordinated omission). Also: the trace (Poisson arrivals with
//! bursts) and a closed-loop capacity probe.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use zerocopy::IntoBytes;

use gatid::api::wire::{ResponseHeader, Status, HEADER_LEN};
use gatid::client::Client;

/// One kind of request in the mix.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub dag: String,
    pub deadline: Duration,
    /// Share of the mix.
    pub weight: f64,
    /// Inputs, used round robin.
    pub inputs: Vec<Vec<u8>>,
}

/// One scheduled request: when (from the start) and which invocation.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Duration,
    pub kind: usize,
}

/// What came back for one request.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub kind: usize,
    pub at: Duration,
    /// Scheduled send → answer; `None` if no answer arrived in time.
    pub latency: Option<Duration>,
    pub status: Option<Status>,
}

/// A small deterministic generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Bursts: every `period`, the first `length` runs at `factor` × the base rate.
#[derive(Debug, Clone, Copy)]
pub struct Bursts {
    pub period: Duration,
    pub length: Duration,
    pub factor: f64,
}

impl Bursts {
    /// Mean rate over a period as a multiple of the base rate.
    pub fn mean_factor(&self) -> f64 {
        let share = self.length.as_secs_f64() / self.period.as_secs_f64();
        1.0 + share * (self.factor - 1.0)
    }

    fn factor_at(&self, t: Duration) -> f64 {
        let phase = t.as_secs_f64() % self.period.as_secs_f64();
        if phase < self.length.as_secs_f64() {
            self.factor
        } else {
            1.0
        }
    }
}

/// Poisson arrivals averaging `mean_rate`/s over `length`, modulated by
/// `bursts` (thinning), each a weighted random pick from `mix`.
pub fn trace(mix: &[Invocation], mean_rate: f64, bursts: Bursts, length: Duration, seed: u64) -> Vec<Arrival> {
    let mut rng = Rng::new(seed);
    let base = mean_rate / bursts.mean_factor();
    let peak = base * bursts.factor.max(1.0);
    let total: f64 = mix.iter().map(|m| m.weight).sum();
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += -rng.unit().ln() / peak;
        let at = Duration::from_secs_f64(t);
        if at >= length {
            return out;
        }
        if rng.unit() * peak > base * bursts.factor_at(at) {
            continue;
        }
        let mut x = rng.unit() * total;
        let kind = mix.iter().position(|m| {
            x -= m.weight;
            x <= 0.0
        });
        out.push(Arrival { at, kind: kind.unwrap_or(mix.len() - 1) });
    }
}

/// Replays `arrivals` open loop over `conns` connections; waits up to `grace`
/// after the last send for answers.
pub fn replay(
    socket: &Path,
    mix: &[Invocation],
    arrivals: &[Arrival],
    conns: usize,
    grace: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let start = Instant::now() + Duration::from_millis(50);
    let end = arrivals.last().map_or(Duration::ZERO, |a| a.at);
    let give_up = start + end + grace;
    let mut outcomes: Vec<Outcome> =
        arrivals.iter().map(|a| Outcome { kind: a.kind, at: a.at, latency: None, status: None }).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut receivers = Vec::new();
        for k in 0..conns {
            let mut tx = UnixStream::connect(socket).context("connecting")?;
            let mut rx = tx.try_clone()?;
            let mine: Vec<usize> = (k..arrivals.len()).step_by(conns).collect();
            let expected = mine.len();
            receivers.push(scope.spawn(move || -> Vec<(usize, Instant, Status)> {
                let mut got = Vec::with_capacity(expected);
                let _ = rx.set_read_timeout(Some(Duration::from_millis(200)));
                let mut hb = [0u8; HEADER_LEN];
                while got.len() < expected && Instant::now() < give_up {
                    match read_full(&mut rx, &mut hb, give_up) {
                        Ok(true) => {}
                        _ => break,
                    }
                    let Ok(h) = ResponseHeader::parse(&hb) else { break };
                    let mut body = vec![0u8; h.payload_len.get() as usize];
                    if !matches!(read_full(&mut rx, &mut body, give_up), Ok(true)) {
                        break;
                    }
                    let status = Status::from_u16(h.status.get()).unwrap_or(Status::Internal);
                    got.push(((h.request_id.get() - 1) as usize, Instant::now(), status));
                }
                got
            }));
            let (mix, arrivals) = (mix, arrivals);
            scope.spawn(move || {
                for (n, &i) in mine.iter().enumerate() {
                    let a = arrivals[i];
                    let when = start + a.at;
                    let now = Instant::now();
                    if when > now {
                        std::thread::sleep(when - now);
                    }
                    let m = &mix[a.kind];
                    let input = &m.inputs[n % m.inputs.len()];
                    let mut h = Client::dag_header(&m.dag, input.len(), 0);
                    h.request_id.set(i as u64 + 1);
                    let mut frame = Vec::with_capacity(HEADER_LEN + input.len());
                    frame.extend_from_slice(h.as_bytes());
                    frame.extend_from_slice(input);
                    if tx.write_all(&frame).is_err() {
                        return;
                    }
                }
            });
        }
        for r in receivers {
            for (i, when, status) in r.join().map_err(|_| anyhow::anyhow!("receiver panicked"))? {
                if let Some(o) = outcomes.get_mut(i) {
                    o.latency = Some(when.saturating_duration_since(start + o.at));
                    o.status = Some(status);
                }
            }
        }
        Ok(())
    })?;
    Ok(outcomes)
}

/// Reads exactly `buf.len()` bytes unless `until` passes (false) or the peer closes (error).
fn read_full(s: &mut UnixStream, buf: &mut [u8], until: Instant) -> std::io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if Instant::now() >= until {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Closed-loop throughput: `outstanding` requests kept in flight (over as
/// many connections, one each, picked from the mix) for `length`, with a
/// loose deadline so that nothing is dropped. Requests per second.
pub fn capacity(socket: &Path, mix: &[Invocation], outstanding: usize, length: Duration) -> anyhow::Result<f64> {
    let total: f64 = mix.iter().map(|m| m.weight).sum();
    let start = Instant::now();
    let done: usize = std::thread::scope(|scope| -> anyhow::Result<usize> {
        let handles: Vec<_> = (0..outstanding)
            .map(|k| {
                scope.spawn(move || -> anyhow::Result<usize> {
                    let mut c = Client::connect(socket)?;
                    let mut rng = Rng::new(k as u64 + 1);
                    let mut n = 0;
                    while start.elapsed() < length {
                        let mut x = rng.unit() * total;
                        let m = mix.iter().find(|m| {
                            x -= m.weight;
                            x <= 0.0
                        });
                        let m = m.unwrap_or(&mix[mix.len() - 1]);
                        let input = &m.inputs[n % m.inputs.len()];
                        c.invoke_dag(&m.dag, input, 10_000_000)?.ok()?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut sum = 0;
        for h in handles {
            sum += h.join().map_err(|_| anyhow::anyhow!("capacity client panicked"))??;
        }
        Ok(sum)
    })?;
    Ok(done as f64 / start.elapsed().as_secs_f64())
}
