//! Turns client images (u8, HWC) into the model's input tensor as the model's
//! config declares: channel conversion, resize, scale/mean/std, layout.

use crate::config::{InputConfig, Layout, Resize};

/// Why an image cannot become the model's input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("image shape {0:?} is not [H, W, C] or [N, H, W, C]")]
    Rank(Vec<usize>),
    #[error("image has {got} channels; the model takes {want}")]
    Channels { got: usize, want: usize },
    #[error("image is {h}x{w}; the model takes {mh}x{mw} and resizing is off")]
    Size { h: usize, w: usize, mh: usize, mw: usize },
    #[error("image has a zero-sized dimension")]
    Empty,
    #[error("image shape {shape:?} needs {want} bytes; got {got}")]
    Length { shape: Vec<usize>, want: usize, got: usize },
    #[error("{n} images of {h}x{w}x{c} is more input than this model takes at once")]
    TooLarge { n: usize, h: usize, w: usize, c: usize },
}

/// Most floats one call may produce (1 GiB of f32), whatever the caller allowed.
pub const MAX_OUTPUT_FLOATS: usize = 1 << 28;

/// Converts `pixels` of `shape` (HWC or NHWC, u8) into `N` rows of model input.
/// Returns the batch size and the f32 data in the model's layout.
pub fn image_to_input(cfg: &InputConfig, shape: &[usize], pixels: &[u8]) -> Result<(usize, Vec<f32>), PreprocessError> {
    let (n, h, w, c) = match *shape {
        [h, w, c] => (1, h, w, c),
        [n, h, w, c] => (n, h, w, c),
        _ => return Err(PreprocessError::Rank(shape.to_vec())),
    };
    if n == 0 || h == 0 || w == 0 || c == 0 {
        return Err(PreprocessError::Empty);
    }
    let want = [n, h, w, c].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(pixels.len()) {
        return Err(PreprocessError::Length {
            shape: shape.to_vec(),
            want: want.unwrap_or(usize::MAX),
            got: pixels.len(),
        });
    }
    let (mh, mw, mc) = (cfg.height, cfg.width, cfg.channels);
    let convertible = c == mc || (mc == 3 && c == 1) || (mc == 1 && (c == 3 || c == 4)) || (mc == 3 && c == 4);
    if !convertible {
        return Err(PreprocessError::Channels { got: c, want: mc });
    }
    if (h, w) != (mh, mw) && cfg.resize == Resize::None {
        return Err(PreprocessError::Size { h, w, mh, mw });
    }
    // The caller bounds n (rows ≤ max_batch); the product is still checked, so a
    // hostile shape can never wrap into a small allocation.
    let floats = [n, mh, mw, mc].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(floats) = floats.filter(|&f| f <= MAX_OUTPUT_FLOATS) else {
        return Err(PreprocessError::TooLarge { n, h, w, c });
    };
    let mut out = vec![0f32; floats];
    let plane = mh * mw;
    let mut px = vec![0f32; mc];
    // (v · scale − mean) / std as v · gain + offset, per channel.
    let gain: Vec<f32> = (0..mc).map(|ch| cfg.scale / cfg.std.get(ch).copied().unwrap_or(1.0)).collect();
    let offset: Vec<f32> =
        (0..mc).map(|ch| -cfg.mean.get(ch).copied().unwrap_or(0.0) / cfg.std.get(ch).copied().unwrap_or(1.0)).collect();
    for b in 0..n {
        let img = Image { data: &pixels[b * h * w * c..(b + 1) * h * w * c], h, w, c };
        let dst = &mut out[b * plane * mc..(b + 1) * plane * mc];
        if (h, w) == (mh, mw) {
            // Same size: every sample falls on a pixel centre, so resampling is
            // the identity (measured: the general path was ~9 % of a busy
            // node's CPU serving 260×260 photos to a 260×260 model).
            for y in 0..mh {
                for x in 0..mw {
                    for ch in 0..mc {
                        let idx = match cfg.layout {
                            Layout::NHWC => (y * mw + x) * mc + ch,
                            Layout::NCHW => ch * plane + y * mw + x,
                        };
                        dst[idx] = img.channel(y, x, ch, mc) * gain[ch] + offset[ch];
                    }
                }
            }
            continue;
        }
        for y in 0..mh {
            // Half-pixel centres, as OpenCV / PIL bilinear do.
            let sy = ((y as f32 + 0.5) * h as f32 / mh as f32 - 0.5).clamp(0.0, (h - 1) as f32);
            for x in 0..mw {
                let sx = ((x as f32 + 0.5) * w as f32 / mw as f32 - 0.5).clamp(0.0, (w - 1) as f32);
                img.sample(cfg.resize, sy, sx, &mut px);
                for (ch, v) in px.iter().enumerate() {
                    let mean = cfg.mean.get(ch).copied().unwrap_or(0.0);
                    let std = cfg.std.get(ch).copied().unwrap_or(1.0);
                    let idx = match cfg.layout {
                        Layout::NHWC => (y * mw + x) * mc + ch,
                        Layout::NCHW => ch * plane + y * mw + x,
                    };
                    dst[idx] = (v * cfg.scale - mean) / std;
                }
            }
        }
    }
    Ok((n, out))
}

/// One HWC u8 image.
struct Image<'a> {
    data: &'a [u8],
    h: usize,
    w: usize,
    c: usize,
}

impl Image<'_> {
    /// Model-channel values at source position (sy, sx), interpolated per `mode`.
    fn sample(&self, mode: Resize, sy: f32, sx: f32, px: &mut [f32]) {
        if mode != Resize::Bilinear || (self.h == 1 && self.w == 1) {
            let (y, x) = (sy.round() as usize, sx.round() as usize);
            let mc = px.len();
            for (ch, v) in px.iter_mut().enumerate() {
                *v = self.channel(y, x, ch, mc);
            }
            return;
        }
        let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(self.h - 1), (x0 + 1).min(self.w - 1));
        let (fy, fx) = (sy - y0 as f32, sx - x0 as f32);
        let mc = px.len();
        for (ch, v) in px.iter_mut().enumerate() {
            let top = self.channel(y0, x0, ch, mc) * (1.0 - fx) + self.channel(y0, x1, ch, mc) * fx;
            let bot = self.channel(y1, x0, ch, mc) * (1.0 - fx) + self.channel(y1, x1, ch, mc) * fx;
            *v = top * (1.0 - fy) + bot * fy;
        }
    }

    /// Value of model channel `ch` (of `mc`) at a source pixel, converting channel counts.
    fn channel(&self, y: usize, x: usize, ch: usize, mc: usize) -> f32 {
        let at = |k: usize| f32::from(self.data[(y * self.w + x) * self.c + k]);
        match (self.c, mc) {
            (1, _) => at(0),
            (3 | 4, 1) => 0.299 * at(0) + 0.587 * at(1) + 0.114 * at(2),
            _ => at(ch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layout: Layout, h: usize, w: usize, c: usize) -> InputConfig {
        InputConfig {
            layout,
            height: h,
            width: w,
            channels: c,
            scale: 1.0,
            mean: vec![],
            std: vec![],
            resize: Resize::Bilinear,
        }
    }

    #[test]
    fn same_size_is_exact_and_layout_is_honoured() {
        let pixels: Vec<u8> = (0..2 * 2 * 3).map(|v| v as u8).collect();
        let (n, nhwc) = image_to_input(&cfg(Layout::NHWC, 2, 2, 3), &[2, 2, 3], &pixels).unwrap();
        assert_eq!(n, 1);
        assert_eq!(nhwc, pixels.iter().map(|&v| f32::from(v)).collect::<Vec<_>>());
        let (_, nchw) = image_to_input(&cfg(Layout::NCHW, 2, 2, 3), &[2, 2, 3], &pixels).unwrap();
        assert_eq!(&nchw[..4], &[0.0, 3.0, 6.0, 9.0]);
    }

    #[test]
    fn same_size_normalises_per_channel_and_converts_channels() {
        let pixels: Vec<u8> = (0..3 * 3 * 4).map(|v| (v * 7) as u8).collect();
        let mut c = cfg(Layout::NCHW, 3, 3, 3);
        (c.scale, c.mean, c.std) = (0.5, vec![127.0, 10.0, 0.0], vec![128.0, 2.0, 1.0]);
        // RGBA in, RGB out: alpha dropped, each channel normalised on its own.
        let (_, v) = image_to_input(&c, &[3, 3, 4], &pixels).unwrap();
        for (i, px) in pixels.chunks_exact(4).enumerate() {
            for ch in 0..3 {
                let want = (f32::from(px[ch]) * 0.5 - c.mean[ch]) / c.std[ch];
                assert!((v[ch * 9 + i] - want).abs() < 1e-5, "pixel {i} channel {ch}: {} vs {want}", v[ch * 9 + i]);
            }
        }
        // RGB in, grey out.
        let mut g = cfg(Layout::NHWC, 3, 3, 1);
        g.std = vec![2.0];
        let (_, v) = image_to_input(&g, &[3, 3, 4], &pixels).unwrap();
        let px = &pixels[4..8];
        let want = (0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2])) / 2.0;
        assert!((v[1] - want).abs() < 1e-4, "{} vs {want}", v[1]);
    }

    #[test]
    fn resize_and_normalise() {
        let pixels = vec![100u8; 8 * 8];
        let mut c = cfg(Layout::NCHW, 4, 4, 1);
        c.scale = 1.0 / 255.0;
        c.mean = vec![0.5];
        c.std = vec![0.25];
        let (_, v) = image_to_input(&c, &[8, 8, 1], &pixels).unwrap();
        let want = (100.0 / 255.0 - 0.5) / 0.25;
        assert!(v.iter().all(|x| (x - want).abs() < 1e-5));
    }

    #[test]
    fn bad_images_are_refused() {
        let c = cfg(Layout::NCHW, 4, 4, 3);
        assert!(matches!(image_to_input(&c, &[4, 4], &[0; 16]), Err(PreprocessError::Rank(_))));
        assert!(matches!(image_to_input(&c, &[4, 4, 2], &[0; 32]), Err(PreprocessError::Channels { .. })));
        assert!(matches!(image_to_input(&c, &[0, 4, 3], &[]), Err(PreprocessError::Empty)));
        assert!(matches!(image_to_input(&c, &[4, 4, 3], &[0; 47]), Err(PreprocessError::Length { .. })));
        let n = 1 << 23;
        assert!(matches!(image_to_input(&c, &[n, 1, 1, 1], &vec![0; n]), Err(PreprocessError::TooLarge { .. })));
    }
}
