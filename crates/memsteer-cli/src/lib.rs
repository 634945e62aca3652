//! The library behind the `memsteer` command: argument definitions and one function per subcommand,
//! so `xtask` and tests drive exactly what users run.
#![deny(missing_docs)]

pub mod compare;
pub mod hmm;
pub mod logprobs;
pub mod plot;
pub mod profile;
mod progress;
pub mod sentiment;
pub mod steer;
pub mod train;

use clap::{Parser, Subcommand};

/// Command-line interface of `memsteer`.
#[derive(Debug, Parser)]
#[command(name = "memsteer", version, about = "Measure what language models memorise, and steer them", long_about = None)]
pub struct Cli {
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Estimate the memorisation profile of a panel of per-instance outcomes across checkpoints.
    Profile(profile::ProfileArgs),
    /// Correlate memorisation profiles (att.csv files) of several models.
    Compare(compare::CompareArgs),
    /// Hidden Markov model laboratory (Theorem 2 of LM-Steer).
    Hmm(hmm::HmmArgs),
    /// Per-instance sequence log-probabilities at every checkpoint, as a panel (resumable, shardable).
    Logprobs(logprobs::LogprobsArgs),
    /// Train a small GPT-NeoX model with every batch logged, writing checkpoints for `logprobs`.
    Train(train::TrainArgs),
    /// LM-Steer: train a steer, generate with it, explain, highlight, evaluate and transfer it.
    Steer(steer::SteerArgs),
}

/// Parses `args` (the program name first, as `std::env::args` gives it) and runs the command: for
/// tools that drive `memsteer` in process, such as `cargo xtask reproduce`.
pub fn run_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    run(Cli::try_parse_from(args)?)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        // Ignore the error when a pool already exists (tests run several commands in one process).
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    match cli.command {
        Command::Profile(args) => profile::run(&args).map(|_| ()),
        Command::Compare(args) => compare::run(&args).map(|_| ()),
        Command::Hmm(args) => hmm::run(&args),
        Command::Logprobs(args) => logprobs::run(&args).map(|_| ()),
        Command::Train(args) => train::run(&args).map(|_| ()),
        Command::Steer(args) => steer::run(&args),
    }
}
