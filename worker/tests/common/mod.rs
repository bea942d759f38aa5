//! Helpers the parity test files share: comparing the Rust outputs with the reference's.

use tch::{Kind, Tensor};

/// The largest absolute difference between two tensors of the same shape, computed in float64.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Asserts parity within `tolerance` and reports the error reached (visible with
/// `--nocapture`); returns the error.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) -> f64 {
    let error = max_abs_diff(actual, expected);
    let scale = expected.abs().max().double_value(&[]);
    println!("{what}: max abs error {error:.3e} (outputs up to {scale:.3})");
    assert!(
        error <= tolerance,
        "{what}: max abs error {error:e} > {tolerance:e}"
    );
    error
}
