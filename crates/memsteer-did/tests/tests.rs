//! Integration tests of `memsteer-did`: peer parity (csdid golden files), properties, errors.

mod api;
mod golden;
mod properties;
