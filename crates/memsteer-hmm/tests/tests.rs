//! Integration tests of `memsteer-hmm`.

mod core;
mod theorem2;
