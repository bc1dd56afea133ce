//! Reading and writing float32 `.npy` files (NumPy format 1.0/2.0, C order).

/// Parses a little-endian float32 C-order `.npy`; returns the shape and the raw data bytes.
pub fn parse_f32(bytes: &[u8]) -> Option<(Vec<u32>, &[u8])> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return None;
    }
    let (hlen, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return None,
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen)?).ok()?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return None;
    }
    let open = header.find("'shape': (")? + "'shape': (".len();
    let close = open + header[open..].find(')')?;
    let shape: Vec<u32> = header[open..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    let data = &bytes[start + hlen..];
    let n: usize = shape.iter().map(|&d| d as usize).product();
    (data.len() == n * 4).then_some((shape, data))
}

/// Serializes a float32 tensor as `.npy`.
pub fn write_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip() {
        let bytes = super::write_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (shape, data) = super::parse_f32(&bytes).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(data.len(), 24);
        assert!(super::parse_f32(b"not numpy").is_none());
    }
}
