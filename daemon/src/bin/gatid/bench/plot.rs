//! Small PNG line plots for benchmark results (no text: the JSON and the
//! printed table carry the numbers; the caption in the docs says what is where).

use std::path::Path;

use image::{Rgb, RgbImage};

const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
const GREY: Rgb<u8> = Rgb([200, 200, 200]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);

fn dot(img: &mut RgbImage, x: i64, y: i64, r: i64, c: Rgb<u8>) {
    for dx in -r..=r {
        for dy in -r..=r {
            let (px, py) = (x + dx, y + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
    for i in 0..=n {
        let x = a.0 + (b.0 - a.0) * i / n;
        let y = a.1 + (b.1 - a.1) * i / n;
        dot(img, x, y, 1, c);
    }
}

/// `gatid bench dispatch`: left panel % deadlines met (0–100 %), right panel
/// p99 latency (log scale, 0.1 ms – 100 s), both against load (0.4–1.0);
/// blue = gati, orange = baseline; grey lines at 99.9 % met and each decade of ms.
pub fn dispatch(path: &Path, points: impl Iterator<Item = (f64, [(f64, f64); 2])>) -> anyhow::Result<()> {
    const W: i64 = 440;
    const H: i64 = 320;
    const M: i64 = 20;
    let mut img = RgbImage::from_pixel((2 * W) as u32, H as u32, Rgb([255, 255, 255]));
    let pts: Vec<(f64, [(f64, f64); 2])> = points.collect();
    let x_of = |panel: i64, load: f64| panel * W + M + ((load - 0.4) / 0.6 * (W - 2 * M) as f64) as i64;
    let y_met = |met: f64| H - M - (met.clamp(0.0, 1.0) * (H - 2 * M) as f64) as i64;
    let y_p99 = |ms: f64| {
        let l = (ms.max(0.1).log10() + 1.0) / 6.0; // 0.1 ms … 100 s
        H - M - (l.clamp(0.0, 1.0) * (H - 2 * M) as f64) as i64
    };
    for panel in 0..2 {
        line(&mut img, (panel * W + M, H - M), (panel * W + W - M, H - M), BLACK);
        line(&mut img, (panel * W + M, M), (panel * W + M, H - M), BLACK);
    }
    line(&mut img, (M, y_met(0.999)), (W - M, y_met(0.999)), GREY);
    for decade in [1.0, 10.0, 100.0, 1000.0, 10_000.0] {
        line(&mut img, (W + M, y_p99(decade)), (2 * W - M, y_p99(decade)), GREY);
    }
    for mode in 0..2 {
        let c = if mode == 0 { BLUE } else { ORANGE };
        let met: Vec<(i64, i64)> = pts.iter().map(|(l, v)| (x_of(0, *l), y_met(v[mode].0))).collect();
        let p99: Vec<(i64, i64)> = pts.iter().map(|(l, v)| (x_of(1, *l), y_p99(v[mode].1))).collect();
        for series in [&met, &p99] {
            for w in series.windows(2) {
                line(&mut img, w[0], w[1], c);
            }
            for &(x, y) in series.iter() {
                dot(&mut img, x, y, 4, c);
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path)?;
    Ok(())
}

/// `gatid bench soak`: one series against time (blue, dots joined), y from 0
/// to 1.2 × its largest value or `limit`; a grey line at `limit` (the soak:
/// RSS in MB, the limit 1.1 × RSS after warm-up).
pub fn over_time(path: &Path, points: &[(f64, f64)], limit: f64) -> anyhow::Result<()> {
    const W: i64 = 640;
    const H: i64 = 320;
    const M: i64 = 20;
    let mut img = RgbImage::from_pixel(W as u32, H as u32, Rgb([255, 255, 255]));
    let t_max = points.iter().map(|p| p.0).fold(1e-9, f64::max);
    let y_max = 1.2 * points.iter().map(|p| p.1).fold(limit, f64::max).max(1e-9);
    let x_of = |t: f64| M + (t / t_max * (W - 2 * M) as f64) as i64;
    let y_of = |v: f64| H - M - ((v / y_max).clamp(0.0, 1.0) * (H - 2 * M) as f64) as i64;
    line(&mut img, (M, H - M), (W - M, H - M), BLACK);
    line(&mut img, (M, M), (M, H - M), BLACK);
    line(&mut img, (M, y_of(limit)), (W - M, y_of(limit)), GREY);
    let pts: Vec<(i64, i64)> = points.iter().map(|&(t, v)| (x_of(t), y_of(v))).collect();
    for w in pts.windows(2) {
        line(&mut img, w[0], w[1], BLUE);
    }
    for &(x, y) in &pts {
        dot(&mut img, x, y, 2, BLUE);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path)?;
    Ok(())
}

/// Series colours for [`cdf`], in order (tab10).
pub const PALETTE: [Rgb<u8>; 8] = [
    BLUE,
    ORANGE,
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
];

/// Empirical CDFs of several series (colours in [`PALETTE`] order), x on a
/// log scale from 0.1 to 1000 (values clamped), y from 0 to 1; grey lines at
/// each decade and at x = 1.
pub fn cdf(path: &Path, series: &[Vec<f64>]) -> anyhow::Result<()> {
    const W: i64 = 640;
    const H: i64 = 400;
    const M: i64 = 20;
    let mut img = RgbImage::from_pixel(W as u32, H as u32, Rgb([255, 255, 255]));
    let x_of = |v: f64| M + (((v.clamp(0.1, 1000.0).log10() + 1.0) / 4.0) * (W - 2 * M) as f64) as i64;
    let y_of = |q: f64| H - M - (q.clamp(0.0, 1.0) * (H - 2 * M) as f64) as i64;
    for decade in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        line(&mut img, (x_of(decade), M), (x_of(decade), H - M), GREY);
    }
    line(&mut img, (M, H - M), (W - M, H - M), BLACK);
    line(&mut img, (M, M), (M, H - M), BLACK);
    for (s, c) in series.iter().zip(PALETTE.iter().cycle()) {
        let mut v = s.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let pts: Vec<(i64, i64)> = v.iter().enumerate().map(|(i, &x)| (x_of(x), y_of((i + 1) as f64 / n))).collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], *c);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path)?;
    Ok(())
}
