//! Hidden Markov models as a laboratory where the truth is known.
//!
//! - [`Hmm`]: validated discrete HMMs, the forward algorithm in the matrix form of the LM-Steer paper
//!   (Eq. 4, `P(o_1..o_T; π) = πᵀ (∏ diag(p(o_t)) T) p(o_T)`) and scaled, next-token distributions,
//!   seeded sampling.
//! - [`theorem2`]: Assumption-1 constructions and LM-Steer's Theorem 2 — switching the initial condition
//!   π → π' is exactly a linear map of the word embeddings — checked exhaustively and on long samples,
//!   with a negative control.
//! - [`simulate`]: synthetic training runs whose per-instance log-probabilities form a memorisation panel,
//!   with the exact counterfactual τ(g, c) from leave-cohort-out retraining.
//!
//! ```
//! use memsteer_hmm::theorem2::{check_theorem2, Theorem2Config};
//! let report = check_theorem2(&Theorem2Config { length: 3, samples: 2, ..Theorem2Config::default() }).unwrap();
//! assert!(report.max_abs_error < 1e-12);
//! assert!(report.control_max_abs_error > 1e-4);
//! ```
#![deny(missing_docs)]

mod error;
pub mod hmm;
mod linalg;
pub mod simulate;
pub mod theorem2;

pub use error::{HmmError, Result};
pub use hmm::Hmm;
