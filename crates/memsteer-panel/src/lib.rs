//! The potential-outcome data model behind memorisation profiles.
//!
//! A [`Panel`] holds one outcome `Y_c(x)` (by default the summed token log-probability of instance
//! `x` under checkpoint `c`) for every instance and every checkpoint of a [`CheckpointGrid`], plus each
//! instance's treatment step: the optimizer step whose batch held it, or none for never-trained
//! (validation) instances. Its [`Cohort`] is the first checkpoint at or after that step.
//!
//! Panels come from the long CSV format (`instance_id,treatment_step,checkpoint_step,outcome`, see
//! [`read`]), from memory ([`Panel::new`]) or from the seeded generator in [`synthetic`].
//! This crate has no ML or statistics dependency; estimators live in `memsteer-did`.
//!
//! ```
//! use memsteer_panel::{read::{parse_csv, ReadOptions}, Cohort};
//! let csv = "instance_id,treatment_step,checkpoint_step,outcome\n\
//!            a,1500,1000,-10.0\na,1500,2000,-8.5\n\
//!            v,never,1000,-10.2\nv,never,2000,-10.1\n";
//! let (panel, _report) = parse_csv(csv.as_bytes(), "inline", &ReadOptions::default()).unwrap();
//! assert_eq!(panel.grid().steps(), &[1000, 2000]);
//! assert_eq!(panel.cohort(0), Cohort::Treated(1));
//! assert_eq!(panel.cohort(1), Cohort::Never);
//! assert_eq!(panel.outcomes(0), &[-10.0, -8.5]);
//! ```
#![deny(missing_docs)]

pub mod durable;
mod error;
mod grid;
mod panel;
pub mod read;
pub mod rng;
pub mod synthetic;

pub use error::{Location, PanelError, Result};
pub use grid::{CheckpointGrid, Cohort};
pub use panel::{Panel, write_atomic};
