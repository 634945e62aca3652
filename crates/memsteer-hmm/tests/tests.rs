//! Integration tests of `memsteer-hmm`.

mod core;
mod simulate;
mod theorem2;
