//! Example function: image pre-processing for the `classify` DAG.
//!
//! Input: an encoded PNG or JPEG image. Output: 32×32×3 RGB, NHWC
//! (row-major, channels last), resized with a triangle (bilinear) filter —
//! the raw 0–255 input the CIFAR-10 model takes. Optional argv: `WxH`
//! (default `32x32`) and the output type: `u8` (default, one byte per value)
//! or `f32` (little-endian floats 0.0–255.0: what a model function takes,
//! e.g. `cifar10` in `configs/dag.toml`).

use image::imageops::FilterType;

fn main() {
    let as_f32 = match std::env::args().nth(2).as_deref() {
        None | Some("u8") => false,
        Some("f32") => true,
        Some(other) => {
            eprintln!("gati-fn-preprocess: output type {other:?} is not u8 or f32");
            std::process::exit(64);
        }
    };
    let (width, height) = match std::env::args().nth(1).as_deref().map(parse_size) {
        None => (32, 32),
        Some(Ok(size)) => size,
        Some(Err(e)) => {
            eprintln!("gati-fn-preprocess: {e}");
            std::process::exit(64);
        }
    };
    gati_sdk::serve(move |input: &[u8]| {
        let decoded = image::load_from_memory(input).map_err(|e| format!("cannot decode image: {e}"))?;
        let rgb = decoded.to_rgb8();
        let resized = if rgb.dimensions() == (width, height) {
            rgb
        } else {
            image::imageops::resize(&rgb, width, height, FilterType::Triangle)
        };
        let pixels = resized.into_raw();
        if as_f32 {
            Ok(pixels.iter().flat_map(|&p| f32::from(p).to_le_bytes()).collect())
        } else {
            Ok(pixels)
        }
    })
}

fn parse_size(arg: &str) -> Result<(u32, u32), String> {
    let (w, h) = arg.split_once('x').ok_or_else(|| format!("size {arg:?} is not WxH"))?;
    let w: u32 = w.parse().map_err(|_| format!("bad width in {arg:?}"))?;
    let h: u32 = h.parse().map_err(|_| format!("bad height in {arg:?}"))?;
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return Err(format!("size {arg:?} out of range"));
    }
    Ok((w, h))
}
