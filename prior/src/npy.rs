//! A writer for NumPy `.npy` files (format version 1.0) of little-endian `f32` arrays, so raw
//! metric depth can be opened with `numpy.load` without any other tooling.
//!
//! The format: the magic `\x93NUMPY`, version bytes `1 0`, a little-endian `u16` header length,
//! an ASCII Python dict literal describing dtype, order and shape, padded with spaces and ended
//! by a newline so that the data starts on a 64-byte boundary, then the raw C-order data.

const MAGIC: &[u8] = b"\x93NUMPY";
const ALIGNMENT: usize = 64;

/// Encodes a C-order `f32` array of the given shape. `data.len()` must be the shape's product.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy shape does not match the data"
    );
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    // A one-dimensional shape needs the trailing comma of a Python 1-tuple.
    let shape_literal = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_literal}, }}");
    let preamble = MAGIC.len() + 2 + 2;
    let total = (preamble + header.len() + 1).div_ceil(ALIGNMENT) * ALIGNMENT;
    header.push_str(&" ".repeat(total - preamble - header.len() - 1));
    header.push('\n');

    let mut out = Vec::with_capacity(total + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in data {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_aligned_and_describes_the_array() {
        let bytes = encode_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + header_len + 24);
        assert_eq!(
            &bytes[10 + header_len + 4..10 + header_len + 8],
            &1.0f32.to_le_bytes()
        );
        let one_dimensional = encode_f32(&[1], &[7.0]);
        let header_len = u16::from_le_bytes([one_dimensional[8], one_dimensional[9]]) as usize;
        let header = std::str::from_utf8(&one_dimensional[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (1,)"));
    }
}
