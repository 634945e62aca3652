//! Criterion benches for memsteer live in `benches/`; peer comparisons (csdid) in `peers/`, driven by
//! `cargo xtask bench-peers`. This library is empty on purpose.
