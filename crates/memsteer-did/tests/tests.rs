//! Integration tests of `memsteer-did`: peer parity (csdid golden files), properties, errors.

mod golden;
mod properties;
