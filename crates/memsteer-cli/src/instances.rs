//! `memsteer instances pythia | olmo`: instances with treatment steps from a published data order
//! (`memsteer_lm::data`), for `memsteer logprobs`. The recipe is in `docs/pythia.md`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use memsteer_lm::data::{DataOrder, IndexedDataset, OlmoOrder, Sampling, Steps, TokenType};

/// The data order to read.
#[derive(Debug, Clone, Subcommand)]
pub enum InstancesCommand {
    /// Pythia's pre-shuffled Pile: a Megatron memory-mapped indexed dataset (PREFIX.idx, PREFIX.bin).
    Pythia {
        /// The dataset's prefix (PREFIX.idx and PREFIX.bin).
        #[arg(long, value_name = "PREFIX")]
        data: PathBuf,
        /// Tokens per row.
        #[arg(long, default_value_t = 2049)]
        seq_len: usize,
        /// Sequences per optimizer step.
        #[arg(long, default_value_t = 1024)]
        batch_size: u64,
        /// What to draw.
        #[command(flatten)]
        draw: DrawArgs,
    },
    /// OLMo: a uint32 global-indices memmap over token memmaps cut into --seq-len instances.
    Olmo {
        /// The global indices (raw uint32 or .npy).
        #[arg(long, value_name = "FILE")]
        global_indices: PathBuf,
        /// Token files, in the order of the training configuration.
        #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        /// Token type of the token files: uint16 or uint32.
        #[arg(long, default_value = "uint16")]
        dtype: String,
        /// Tokens per instance.
        #[arg(long)]
        seq_len: usize,
        /// Instances per optimizer step.
        #[arg(long)]
        batch_size: u64,
        /// What to draw.
        #[command(flatten)]
        draw: DrawArgs,
    },
}

/// What to draw, shared by both layouts.
#[derive(Debug, Clone, Args)]
pub struct DrawArgs {
    /// Analysed optimizer steps FIRST:LAST[:STRIDE] (1-based: step s is the batch before checkpoint step{s}).
    #[arg(long)]
    steps: String,
    /// Instances drawn per analysed step.
    #[arg(long)]
    per_step: usize,
    /// Validation instances, from steps after the last analysed one.
    #[arg(long, default_value_t = 0)]
    validation: usize,
    /// Steps to draw validation instances from (default: all after the last analysed step).
    #[arg(long, value_name = "FIRST:LAST")]
    validation_steps: Option<String>,
    /// The first step of a second pass over the data (e.g. Pythia's deduplicated runs).
    #[arg(long)]
    epoch_steps: Option<u64>,
    /// Keep the first T tokens of each sequence.
    #[arg(long, value_name = "T")]
    truncate: Option<usize>,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output instances file (JSON lines).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `memsteer instances`.
pub fn run(command: &InstancesCommand) -> Result<memsteer_lm::data::Sampled> {
    let (order, batch_size, draw): (Box<dyn DataOrder>, u64, &DrawArgs) = match command {
        InstancesCommand::Pythia { data, seq_len, batch_size, draw } => {
            (Box::new(IndexedDataset::open(data)?.with_seq_len(*seq_len)), *batch_size, draw)
        }
        InstancesCommand::Olmo { global_indices, data, dtype, seq_len, batch_size, draw } => {
            let order = OlmoOrder::open(global_indices, data, TokenType::parse(dtype)?, *seq_len)?;
            (Box::new(order), *batch_size, draw)
        }
    };
    let sampling = Sampling {
        steps: Steps::parse(&draw.steps)?,
        per_step: draw.per_step,
        validation: draw.validation,
        validation_steps: draw.validation_steps.as_deref().map(Steps::parse).transpose()?,
        batch_size,
        epoch_steps: draw.epoch_steps,
        truncate: draw.truncate,
        seed: draw.seed,
    };
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} instances read, {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let out =
        memsteer_lm::data::sample_to_file(order.as_ref(), &sampling, &draw.out, &mut |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    let (st, treated, validation) = (sampling.steps, out.treated, out.validation);
    let from = out.validation_steps.map_or(String::new(), |v| format!(" from steps {}..={}", v.first, v.last));
    eprintln!(
        "wrote {} instances to {}: {treated} from steps {}..={} every {}, {validation} validation{from}",
        treated + validation,
        draw.out.display(),
        st.first,
        st.last,
        st.stride
    );
    for (n, what) in [
        (out.padding_only, "sequence(s) holding only padding (token 0) left out"),
        (out.repeats, "position(s) repeating an instance drawn before left out"),
        (out.second_pass_steps, "analysed step(s) in the second pass over the data: their instances were seen before"),
    ] {
        if n > 0 {
            eprintln!("warning: {n} {what}");
        }
    }
    Ok(out)
}
