//! The library behind the `memsteer` command: argument definitions and one function per subcommand,
//! so `xtask` and tests drive exactly what users run.
#![deny(missing_docs)]

pub mod compare;
pub mod hmm;
pub mod instances;
pub mod logprobs;
pub mod profile;
mod progress;
pub mod steer;
pub mod train;

use clap::{Parser, Subcommand};

/// Command-line interface of `memsteer`.
#[derive(Debug, Parser)]
#[command(name = "memsteer", version, about = "Measure what language models memorise, and steer them", long_about = None,
    after_help = "User guide, one page per task: docs/guide/README.md")]
pub struct Cli {
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// How the CPU multiplies a model's weights: `auto` (bf16 products with f32 accumulation for
    /// checkpoints stored in bf16, on CPUs with AMX; f32 otherwise), `f32`
    /// (exact f32 whatever the storage) or `bf16` (on any CPU). MEMSTEER_CPU_KERNELS forces a kernel
    /// level; see docs/performance.md.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "f32", "bf16"])]
    pub compute: String,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Estimate the memorisation profile of a panel of per-instance outcomes across checkpoints.
    #[command(after_help = "Guide: docs/guide/1-profile.md")]
    Profile(profile::ProfileArgs),
    /// Correlate memorisation profiles (att.csv files) of several models.
    #[command(after_help = "Guide: docs/guide/1-profile.md")]
    Compare(compare::CompareArgs),
    /// Hidden Markov model laboratory (Theorem 2 of LM-Steer).
    #[command(after_help = "Guide: docs/guide/4-hmm.md")]
    Hmm(hmm::HmmArgs),
    /// Instances with treatment steps from Pythia's or OLMo's published data order, for `logprobs`.
    #[command(subcommand, after_help = "Recipe: docs/pythia.md")]
    Instances(instances::InstancesCommand),
    /// Per-instance sequence log-probabilities at every checkpoint, as a panel (resumable, shardable).
    #[command(after_help = "Guide: docs/guide/2-train-and-score.md")]
    Logprobs(logprobs::LogprobsArgs),
    /// Train a small model with every batch logged, writing checkpoints for `logprobs`.
    #[command(args_override_self = true, after_help = "Guide: docs/guide/2-train-and-score.md")]
    Train(train::TrainArgs),
    /// LM-Steer: train a steer, generate with it, explain, highlight, evaluate and transfer it.
    #[command(after_help = "Guide: docs/guide/3-steer.md")]
    Steer(steer::SteerArgs),
    /// An OpenAI-compatible server for steered generation: steers and strengths chosen per request.
    #[command(after_help = "Guide: docs/guide/5-serve.md")]
    Serve(memsteer_serve::cli::ServeArgs),
}

/// Parses `args` (the program name first, as `std::env::args` gives it) and runs the command: for
/// tools that drive `memsteer` in process, such as `cargo xtask reproduce`.
pub fn run_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    run(Cli::try_parse_from(expand_config(args)?)?)
}

/// Expands `memsteer train --config FILE`: the TOML file's keys (the long flags' names, with `_` or
/// `-`) become flags, except those the command line gives (or excludes: `--steps` drops a file's
/// `epochs`), so the command line overrides the file. Values: strings, numbers, `true` for a switch
/// that is on (`false` leaves it off) and arrays (joined with commas, e.g. `checkpoint_steps = [0, 1,
/// 2, 4]`). Relative paths are taken from the current directory, as on the command line. An unknown
/// key, or a value of the wrong kind, is an error naming the file.
pub fn expand_config(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::{Context, bail};
    use clap::CommandFactory;
    // The subcommand is the first word that is neither a flag nor the value of the global --threads.
    let mut sub = None;
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--threads" || a == "--compute" {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            sub = Some(i);
            break;
        }
        i += 1;
    }
    let Some(sub) = sub.filter(|&i| args[i] == "train") else { return Ok(args) };
    let mut path = None;
    let mut given: Vec<String> = Vec::new();
    for (i, a) in args.iter().enumerate().skip(sub + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = Some(args.get(i + 1).context("--config needs a FILE")?.clone());
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.into());
        } else if let Some(flag) = a.strip_prefix("--") {
            given.push(flag.split('=').next().unwrap_or_default().to_string());
        }
    }
    let Some(path) = path else { return Ok(args) };
    let shown = std::path::Path::new(&path).display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {shown}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{shown}: not a TOML table"))?;
    let mut cmd = Cli::command();
    // Built, so that conflicts are known from both sides.
    cmd.build();
    let train = cmd.find_subcommand("train").context("the train command")?;
    let known: Vec<&str> = train.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config").collect();
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        let Some(arg) = train.get_arguments().find(|a| a.get_long() == Some(flag.as_str()) && flag != "config") else {
            bail!("{shown}: unknown key `{key}`; `memsteer train` takes {}", known.join(", "));
        };
        // The command line overrides the file: a key whose flag, or a flag it excludes (--steps and
        // --epochs, --model-config and --init), is given on the command line is left out.
        let conflicts = |a: &clap::Arg| -> Vec<String> {
            train.get_arg_conflicts_with(a).iter().filter_map(|c| c.get_long().map(String::from)).collect()
        };
        // Conflicts are declared on one side only (e.g. on --steps), so look from both.
        let excluded = conflicts(arg).iter().any(|l| given.contains(l))
            || given.iter().any(|g| {
                train
                    .get_arguments()
                    .find(|a| a.get_long() == Some(g.as_str()))
                    .is_some_and(|a| conflicts(a).contains(&flag))
            });
        if given.contains(&flag) || excluded {
            continue;
        }
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values())
            && !matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse);
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => bail!("{shown}: key `{key}`: expected a string, a number or an array of them"),
            })
        };
        match (value, takes_value) {
            (toml::Value::Boolean(true), false) => extra.push(format!("--{flag}").into()),
            (toml::Value::Boolean(false), false) => {}
            (_, false) => bail!("{shown}: key `{key}` is a switch: expected true or false"),
            (toml::Value::Boolean(_), true) => bail!("{shown}: key `{key}` takes a value, not true or false"),
            (toml::Value::Array(items), true) => {
                let parts = items.iter().map(scalar).collect::<anyhow::Result<Vec<_>>>()?;
                extra.push(format!("--{flag}={}", parts.join(",")).into());
            }
            (other, true) => extra.push(format!("--{flag}={}", scalar(other)?).into()),
        }
    }
    let mut out = args[..=sub].to_vec();
    out.extend(extra);
    out.extend(args[sub + 1..].iter().cloned());
    Ok(out)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        // Ignore the error when a pool already exists (tests run several commands in one process).
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    memsteer_lm::cpu::set_default_compute(memsteer_lm::Compute::parse(&cli.compute)?);
    match cli.command {
        Command::Profile(args) => profile::run(&args).map(|_| ()),
        Command::Compare(args) => compare::run(&args).map(|_| ()),
        Command::Hmm(args) => hmm::run(&args),
        Command::Instances(command) => instances::run(&command).map(|_| ()),
        Command::Logprobs(args) => logprobs::run(&args).map(|_| ()),
        Command::Train(args) => train::run(&args).map(|_| ()),
        Command::Steer(args) => steer::run(&args),
        Command::Serve(args) => memsteer_serve::cli::run(&args, cli.threads),
    }
}
