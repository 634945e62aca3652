//! Operand checks of device operations: every buffer lives on the operation's device, and no output
//! overlaps an input or another output (the CPU side gets the same guarantee from Rust's borrows).
//! Compiled without the `cuda` feature too, so that the rules are tested on every machine.

use crate::{KernelError, Result};

/// The bytes `[start, end)` of one operand on CUDA device `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Span {
    pub device: usize,
    pub start: u64,
    pub end: u64,
}

/// Checks one operation's operands: each lives on `device`, and no output overlaps an input or another
/// output, except an output that is exactly one of the inputs when the operation works in place
/// (`in_place`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn check(
    device: usize,
    op: &'static str,
    inputs: &[(&'static str, Span)],
    outputs: &[(&'static str, Span)],
    in_place: bool,
) -> Result<()> {
    for &(what, v) in inputs.iter().chain(outputs) {
        if v.device != device {
            return Err(KernelError::WrongDevice { op, what, expected: device, found: v.device });
        }
    }
    let overlap = |a: Span, b: Span| a.start < b.end && b.start < a.end;
    for (i, &(output, o)) in outputs.iter().enumerate() {
        for &(other, x) in inputs {
            if overlap(o, x) && !(in_place && o == x) {
                return Err(KernelError::Aliasing { op, output, other });
            }
        }
        for &(other, x) in &outputs[i + 1..] {
            if overlap(o, x) {
                return Err(KernelError::Aliasing { op, output, other });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn at(device: usize, start: u64, end: u64) -> Span {
        Span { device, start, end }
    }

    #[test]
    fn wrong_devices_and_aliasing_outputs_are_errors() {
        let (a, b, c) = (at(0, 0, 64), at(0, 64, 128), at(0, 128, 192));
        assert!(check(0, "op", &[("a", a), ("b", b)], &[("c", c)], false).is_ok());
        // A buffer of device 1 in an operation on device 0.
        let e = check(0, "matmul", &[("A", at(1, 0, 64))], &[("C", c)], false).unwrap_err();
        assert!(matches!(e, KernelError::WrongDevice { what: "A", expected: 0, found: 1, .. }), "{e}");
        assert!(e.to_string().contains("device 1"), "{e}");
        // An output overlapping an input by one byte.
        let e = check(0, "matmul", &[("A", a)], &[("C", at(0, 63, 100))], false).unwrap_err();
        assert!(matches!(e, KernelError::Aliasing { output: "C", other: "A", .. }), "{e}");
        // Two outputs overlapping each other.
        let e = check(0, "qkv split", &[("qkv", a)], &[("q", b), ("k", at(0, 100, 140))], false).unwrap_err();
        assert!(matches!(e, KernelError::Aliasing { output: "q", other: "k", .. }), "{e}");
        // In place: the very same buffer is allowed where the operation says so, a shifted one never.
        assert!(check(0, "bias", &[("input", a)], &[("output", a)], true).is_ok());
        assert!(check(0, "bias", &[("input", a)], &[("output", a)], false).is_err());
        assert!(check(0, "bias", &[("input", a)], &[("output", at(0, 8, 72))], true).is_err());
        // Adjacent ranges do not overlap; empty ranges overlap nothing.
        assert!(check(0, "op", &[("a", a)], &[("b", b), ("empty", at(0, 64, 64))], false).is_ok());
    }
}
