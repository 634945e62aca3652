//! `memsteer hmm …`: the HMM laboratory.

use anyhow::Result;
use clap::{Args, Subcommand};
use memsteer_hmm::theorem2::{Theorem2Config, Theorem2Report, check_theorem2};

/// Arguments of `memsteer hmm`.
#[derive(Debug, Clone, Args)]
pub struct HmmArgs {
    /// What to run.
    #[command(subcommand)]
    pub command: HmmCommand,
}

/// `memsteer hmm` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum HmmCommand {
    /// Check LM-Steer's Theorem 2 on a random Assumption-1 HMM (switching the initial condition is a
    /// linear map of the word embeddings), with a negative control.
    Theorem2(Theorem2Args),
}

/// Arguments of `memsteer hmm theorem2`.
#[derive(Debug, Clone, Args)]
pub struct Theorem2Args {
    /// Seed of the random construction.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Semantic states.
    #[arg(long, default_value_t = 4)]
    pub states: usize,
    /// Condition states (≥ 2).
    #[arg(long, default_value_t = 2)]
    pub conditions: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 5)]
    pub vocab: usize,
    /// Check every sequence up to this length.
    #[arg(long, default_value_t = 5)]
    pub length: usize,
    /// Also check this many sampled sequences of length 200.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `memsteer hmm …`.
pub fn run(args: &HmmArgs) -> Result<()> {
    match &args.command {
        HmmCommand::Theorem2(a) => {
            let report = theorem2(a)?;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_theorem2(&report);
            }
            Ok(())
        }
    }
}

/// Runs the Theorem 2 check.
pub fn theorem2(a: &Theorem2Args) -> Result<Theorem2Report> {
    Ok(check_theorem2(&Theorem2Config {
        seed: a.seed,
        semantic_states: a.states,
        condition_states: a.conditions,
        vocab: a.vocab,
        length: a.length,
        samples: a.samples,
        sample_length: 200,
    })?)
}

fn print_theorem2(r: &Theorem2Report) {
    println!(
        "Theorem 2 on a random Assumption-1 HMM: {} semantic + {} condition states, {} symbols (seed {})",
        r.semantic_states, r.condition_states, r.vocab, r.seed
    );
    println!("  Assumption 1 violation of the construction: {:.1e}", r.assumption1_violation);
    println!(
        "  identity P_π'(x) = P_(π, WE)(x) over all {} sequences up to length {}: max abs error {:.1e} (relative {:.1e})",
        r.sequences_checked, r.length, r.max_abs_error, r.max_rel_error
    );
    println!("  along {} sampled tokens: max |Δ log P(next)| {:.1e}", r.sampled_tokens, r.sampled_max_abs_log_error);
    println!("  without steering the distributions differ by up to {:.1e}", r.unsteered_max_abs_error);
    println!(
        "  negative control (semantic change, least-squares W): max abs error {:.1e} (relative {:.1e})",
        r.control_max_abs_error, r.control_max_rel_error
    );
}
