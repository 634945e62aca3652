//! Integration tests of `memsteer-panel`: the reader's behaviour and errors, and round trips.

mod read;
mod roundtrip;
