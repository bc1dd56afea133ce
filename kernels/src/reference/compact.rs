//! Order-preserving batch compaction (`cu/compact.cu`).

use crate::KernelError;

/// Largest batch the one-block scan kernel compacts.
pub const MAX_COMPACT_ROWS: usize = 1024;

/// The original indices of the missed rows (`hit == 0`), in order.
pub fn compact_index(hit: &[i32]) -> Result<Vec<u32>, KernelError> {
    if hit.len() > MAX_COMPACT_ROWS {
        return Err(KernelError::Shape(format!("{} rows; compaction takes at most {MAX_COMPACT_ROWS}", hit.len())));
    }
    Ok(hit.iter().enumerate().filter(|(_, &h)| h == 0).map(|(i, _)| i as u32).collect())
}

/// `dst[j] = src[src_of_dst[j]]`, rows of `row_len` values.
pub fn gather_rows(src: &[f32], row_len: usize, src_of_dst: &[u32]) -> Result<Vec<f32>, KernelError> {
    let rows = src.len().checked_div(row_len).unwrap_or(0);
    let mut out = Vec::with_capacity(src_of_dst.len() * row_len);
    for &i in src_of_dst {
        let i = i as usize;
        if i >= rows {
            return Err(KernelError::Shape(format!("row {i} of {rows}")));
        }
        out.extend_from_slice(&src[i * row_len..(i + 1) * row_len]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_keep_their_order() {
        let idx = compact_index(&[1, 0, 0, 1, 0]).unwrap();
        assert_eq!(idx, [1, 2, 4]);
        let src: Vec<f32> = (0..10).map(|v| v as f32).collect();
        assert_eq!(gather_rows(&src, 2, &idx).unwrap(), [2.0, 3.0, 4.0, 5.0, 8.0, 9.0]);
        assert!(compact_index(&[1, 1]).unwrap().is_empty());
        assert!(gather_rows(&src, 2, &[5]).is_err());
        assert!(compact_index(&[0; MAX_COMPACT_ROWS + 1]).is_err());
    }
}
