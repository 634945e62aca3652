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
    /// Learn the steer from samples of the π' process by the LM-Steer objective and compare it with the
    /// analytic W of Theorem 2, for growing sample sizes.
    LearnSteer(LearnArgs),
    /// Simulate a training run on HMM data: write the per-instance panel and the exact counterfactual
    /// memorisation τ(g, c).
    Simulate(SimulateArgs),
}

/// Arguments of `memsteer hmm learn-steer`.
#[derive(Debug, Clone, Args)]
pub struct LearnArgs {
    /// Seed of the construction and the samples.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Training-set sizes (sequences of 20 tokens), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub samples: Vec<usize>,
    /// Levenberg–Marquardt iterations per fit (at most).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the learned-steer experiment.
pub fn learn(a: &LearnArgs) -> Result<Vec<memsteer_hmm::theorem2::LearnedSteer>> {
    let cfg = memsteer_hmm::theorem2::LearnConfig {
        model: Theorem2Config { seed: a.seed, ..Theorem2Config::default() },
        sample_sizes: a.samples.clone(),
        steps: a.steps,
        ..Default::default()
    };
    Ok(memsteer_hmm::theorem2::learn_steers(&cfg)?)
}

/// Arguments of `memsteer hmm simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output directory: panel.csv, truth.csv, simulation.json.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Hidden states of the data HMM.
    #[arg(long, default_value_t = 4)]
    pub states: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 8)]
    pub vocab: usize,
    /// Tokens per instance.
    #[arg(long, default_value_t = 24)]
    pub length: usize,
    /// Instances per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Optimizer steps (one epoch).
    #[arg(long, default_value_t = 240)]
    pub steps: usize,
    /// Never-trained validation instances.
    #[arg(long, default_value_t = 400)]
    pub validation: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,
    /// Mix this much of another emission matrix into the validation data (0–1).
    #[arg(long, default_value_t = 0.0)]
    pub validation_shift: f64,
    /// Counterfactual: replace the cohort's batches by fresh ones, or skip them.
    #[arg(long, value_enum, default_value = "substitute")]
    pub counterfactual: CounterfactualArg,
    /// Counterfactual runs per cohort (substitute), averaged.
    #[arg(long, default_value_t = 8)]
    pub replicates: usize,
}

/// `--counterfactual` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CounterfactualArg {
    /// Fresh batches in place of the cohort's.
    Substitute,
    /// The cohort's steps skipped.
    Remove,
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
        HmmCommand::Simulate(a) => simulate(a).map(|_| ()),
        HmmCommand::LearnSteer(a) => {
            let curve = learn(a)?;
            if a.json {
                for p in &curve {
                    println!("{}", serde_json::to_string(p)?);
                }
            } else {
                println!(
                    "{:>8} {:>8} {:>10} {:>10} {:>12} {:>10}",
                    "samples", "tokens", "TV learned", "TV none", "KL learned", "‖ΔWE‖ rel"
                );
                for p in &curve {
                    println!(
                        "{:>8} {:>8} {:>10.2e} {:>10.2e} {:>12.2e} {:>10.3}",
                        p.samples, p.tokens, p.tv, p.tv_unsteered, p.kl, p.distance_to_analytic
                    );
                }
                println!(
                    "(KL of the analytic W: {:.1e}; TV = mean total variation to the π' process on held-out contexts)",
                    curve.first().map_or(f64::NAN, |p| p.kl_analytic)
                );
            }
            Ok(())
        }
    }
}

/// Runs `memsteer hmm simulate`, returning the simulation.
pub fn simulate(a: &SimulateArgs) -> Result<memsteer_hmm::simulate::Simulation> {
    use memsteer_hmm::simulate::{Counterfactual, SimulationConfig};
    let cfg = SimulationConfig {
        seed: a.seed,
        states: a.states,
        vocab: a.vocab,
        length: a.length,
        batch_size: a.batch_size,
        steps: a.steps,
        validation: a.validation,
        learning_rate: a.lr,
        validation_shift: a.validation_shift,
        counterfactual: match a.counterfactual {
            CounterfactualArg::Substitute => Counterfactual::Substitute,
            CounterfactualArg::Remove => Counterfactual::Remove,
        },
        replicates: a.replicates,
        ..SimulationConfig::default()
    };
    let sim = memsteer_hmm::simulate::simulate(&cfg)?;
    sim.write(&a.out, &cfg)?;
    println!(
        "simulated {} instances × {} checkpoints ({} cohorts); wrote {}",
        sim.panel.n_instances(),
        sim.panel.n_checkpoints(),
        sim.truth.len() / sim.panel.n_checkpoints().max(1),
        a.out.display()
    );
    Ok(sim)
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
