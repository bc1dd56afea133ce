//! Example function: top-k post-processing for the `classify` DAG.
//!
//! Input: little-endian `f32` logits (one per class). Output: JSON
//! `[{"class":3,"p":0.8123},…]`, the k most probable classes after a softmax,
//! most probable first. argv[1]: k (default 3).

fn main() {
    let k: usize = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 3,
        Some(Ok(k)) if k > 0 => k,
        _ => {
            eprintln!("gati-fn-topk: k must be a positive integer");
            std::process::exit(64);
        }
    };
    gati_sdk::serve(move |input: &[u8]| top_k(input, k).map(String::into_bytes))
}

fn top_k(input: &[u8], k: usize) -> Result<String, String> {
    if input.is_empty() || !input.len().is_multiple_of(4) {
        return Err(format!("expected little-endian f32 logits, got {} bytes", input.len()));
    }
    let logits: Vec<f32> = input.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if logits.iter().any(|x| !x.is_finite()) {
        return Err("logits must be finite".into());
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut ranked: Vec<(usize, f32)> = exps.iter().map(|e| e / sum).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let items: Vec<String> =
        ranked.iter().take(k).map(|(class, p)| format!("{{\"class\":{class},\"p\":{p:.6}}}")).collect();
    Ok(format!("[{}]", items.join(",")))
}
