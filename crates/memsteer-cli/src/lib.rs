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
    #[command(args_override_self = true)]
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
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    run(Cli::try_parse_from(expand_config(args)?)?)
}

/// Expands `memsteer train --config FILE`: the TOML file's keys (the long flags' names, with `_` or
/// `-`) become flags placed before those on the command line, which therefore override them. Values:
/// strings, numbers, `true` (a switch that is on; `false` leaves it off) and arrays (joined with
/// commas, e.g. `checkpoint_steps = [0, 1, 2, 4]`). An unknown key is an error naming the file.
pub fn expand_config(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::{Context, bail};
    use clap::CommandFactory;
    // `memsteer train`, not `memsteer steer train`: the first word that is not a flag or its value.
    let Some(sub) = args.iter().position(|a| a == "train") else { return Ok(args) };
    if args[..sub].iter().any(|a| a == "steer") {
        return Ok(args);
    }
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(sub + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = Some(args.get(i + 1).context("--config needs a FILE")?.clone());
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.into());
        }
    }
    let Some(path) = path else { return Ok(args) };
    let shown = std::path::Path::new(&path).display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {shown}"))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{shown}: not a TOML table"))?;
    let cmd = Cli::command();
    let train = cmd.find_subcommand("train").context("the train command")?;
    let known: Vec<&str> = train.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config").collect();
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag.as_str()) {
            bail!("{shown}: unknown key `{key}`; `memsteer train` takes {}", known.join(", "));
        }
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => bail!("{shown}: key `{key}`: expected a string, a number or an array of them"),
            })
        };
        match value {
            toml::Value::Boolean(true) => extra.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let parts = items.iter().map(scalar).collect::<anyhow::Result<Vec<_>>>()?;
                extra.extend([format!("--{flag}").into(), parts.join(",").into()]);
            }
            other => extra.extend([format!("--{flag}").into(), scalar(other)?.into()]),
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
    match cli.command {
        Command::Profile(args) => profile::run(&args).map(|_| ()),
        Command::Compare(args) => compare::run(&args).map(|_| ()),
        Command::Hmm(args) => hmm::run(&args),
        Command::Logprobs(args) => logprobs::run(&args).map(|_| ()),
        Command::Train(args) => train::run(&args).map(|_| ()),
        Command::Steer(args) => steer::run(&args),
    }
}
