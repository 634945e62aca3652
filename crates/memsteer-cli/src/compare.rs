//! `memsteer compare`: correlations between memorisation profiles of several models.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use memsteer_did::compare::{CompareCells, Correlation, profile_correlation};

/// Arguments of `memsteer compare`.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Two or more att.csv files written by `memsteer profile`.
    #[arg(required = true, num_args = 2..)]
    pub profiles: Vec<PathBuf>,
    /// Labels for the profiles (default: the parent directory names).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Use only cells significant in both profiles (default: all shared post-treatment cells).
    #[arg(long)]
    pub significant_only: bool,
    /// Write the matrix (CSV) and its figure (SVG, PNG) into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Correlation matrix of several profiles.
#[derive(Debug, Clone)]
pub struct CompareOutcome {
    /// Labels, one per profile.
    pub labels: Vec<String>,
    /// Row-major `n × n` correlations.
    pub matrix: Vec<Correlation>,
}

/// Runs `memsteer compare`.
pub fn run(args: &CompareArgs) -> Result<CompareOutcome> {
    let labels: Vec<String> = match &args.labels {
        Some(l) => {
            anyhow::ensure!(
                l.len() == args.profiles.len(),
                "--labels has {} names for {} profiles",
                l.len(),
                args.profiles.len()
            );
            l.clone()
        }
        None => args
            .profiles
            .iter()
            .map(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
            })
            .collect(),
    };
    let rows: Vec<_> = args
        .profiles
        .iter()
        .map(|p| memsteer_did::io::read_att_csv(p).with_context(|| format!("reading profile {}", p.display())))
        .collect::<Result<_>>()?;
    let cells = if args.significant_only { CompareCells::Significant } else { CompareCells::All };
    let n = rows.len();
    let mut matrix = Vec::with_capacity(n * n);
    for a in &rows {
        for b in &rows {
            matrix.push(profile_correlation(a, b, cells));
        }
    }
    let width = labels.iter().map(|l| l.len()).max().unwrap_or(0).max(8);
    print!("{:width$}", "");
    for l in &labels {
        print!("  {l:>width$}");
    }
    println!();
    for (i, l) in labels.iter().enumerate() {
        print!("{l:width$}");
        for j in 0..n {
            let c = matrix[i * n + j];
            print!("  {:>width$}", if c.r.is_finite() { format!("{:.3}", c.r) } else { "n/a".into() });
        }
        println!();
    }
    println!(
        "(Pearson r over shared post-treatment cells{})",
        if args.significant_only { ", significant in both" } else { "" }
    );
    let outcome = CompareOutcome { labels, matrix };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let csv = dir.join("correlations.csv");
        memsteer_panel::write_atomic(&csv, |w| {
            write!(w, "profile")?;
            for l in &outcome.labels {
                write!(w, ",{l}")?;
            }
            writeln!(w)?;
            for (i, l) in outcome.labels.iter().enumerate() {
                write!(w, "{l}")?;
                for j in 0..n {
                    write!(w, ",{}", outcome.matrix[i * n + j].r)?;
                }
                writeln!(w)?;
            }
            Ok(())
        })
        .with_context(|| format!("writing {}", csv.display()))?;
        memsteer_plot::correlation_figures(&outcome.labels, &outcome.matrix, dir)?;
    }
    Ok(outcome)
}
