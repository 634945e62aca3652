//! `memsteer profile`: panel in, memorisation profile, summaries, diagnostics and figures out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use memsteer_did::{
    BandMethod, BandScope, BasePeriod, ControlGroup, DidError, Estimator, Multiplier, Profile, ProfileConfig,
};
use memsteer_panel::PanelError;
use memsteer_panel::read::{ColumnMap, IncompletePolicy, ReadOptions, ReadReport, TreatmentEncoding};

use crate::progress::Bar;

/// Estimator choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EstimatorArg {
    /// Difference-in-differences.
    Did,
    /// Difference of levels (biased when levels differ at baseline).
    Difference,
}

/// Control-group choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ControlArg {
    /// Never-trained instances.
    Never,
    /// Never-trained plus not-yet-trained instances.
    NotYet,
}

/// Base-period choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BaseArg {
    /// g−1 for post cells, c−1 for pre cells.
    Varying,
    /// g−1 always.
    Universal,
}

/// Multiplier choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MultiplierArg {
    /// ±1.
    Rademacher,
    /// Mammen's two-point weights.
    Mammen,
}

/// `--band-method` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BandMethodArg {
    /// Student-t critical values per cell at the sup-t level, analytic SEs.
    Student,
    /// csdid's construction.
    Csdid,
}

/// Band-scope choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BandArg {
    /// All cells, pre and post.
    All,
    /// Post-treatment cells only.
    Post,
}

/// Arguments of `memsteer profile`.
#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    /// Panel file: long CSV (instance_id,treatment_step,checkpoint_step,outcome) or Parquet.
    #[arg(long)]
    pub panel: PathBuf,
    /// Output directory [default: PANEL's stem + `-profile`, next to PANEL].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Estimator.
    #[arg(long, value_enum, default_value = "did")]
    pub estimator: EstimatorArg,
    /// Control group.
    #[arg(long, value_enum, default_value = "never")]
    pub control: ControlArg,
    /// Base period of DiD comparisons.
    #[arg(long = "base-period", value_enum, default_value = "varying")]
    pub base_period: BaseArg,
    /// Multiplier-bootstrap draws; 0 = analytic inference only (bands then hold pointwise intervals).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Distribution of the bootstrap multipliers.
    #[arg(long, value_enum, default_value = "rademacher")]
    pub multiplier: MultiplierArg,
    /// Cells covered by the uniform band.
    #[arg(long, value_enum, default_value = "all")]
    pub band: BandArg,
    /// Uniform band: student (holds its level with small cohorts) or csdid (csdid's construction).
    #[arg(long, value_enum, default_value = "student")]
    pub band_method: BandMethodArg,
    /// Significance level.
    #[arg(long, default_value_t = 0.05)]
    pub alpha: f64,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 20240101)]
    pub seed: u64,
    /// Drop instances that lack some checkpoints instead of failing.
    #[arg(long)]
    pub drop_incomplete: bool,
    /// Column holding instance ids.
    #[arg(long, default_value = "instance_id")]
    pub instance_col: String,
    /// Column holding checkpoint steps.
    #[arg(long, default_value = "checkpoint_step")]
    pub checkpoint_col: String,
    /// Column holding outcomes.
    #[arg(long, default_value = "outcome")]
    pub outcome_col: String,
    /// Column of treatment steps (or sequence indices with --treatment-from-seq-idx).
    #[arg(long)]
    pub treatment_col: Option<String>,
    /// Decode Pythia's seq_idx into the treatment step with this batch size (seq_idx ≤ 0: validation).
    #[arg(long, value_name = "BATCH_SIZE")]
    pub treatment_from_seq_idx: Option<u64>,
    /// Negate outcomes (for losses / surprisals, so that memorisation is positive).
    #[arg(long)]
    pub negate: bool,
    /// Keep only checkpoints (and cohorts) up to this step, e.g. the end of the first epoch.
    #[arg(long)]
    pub max_step: Option<u64>,
    /// Draw a dashed line at this step in the profile figure (e.g. the end of the first epoch).
    #[arg(long)]
    pub mark_step: Option<u64>,
    /// Warn about cohorts smaller than this.
    #[arg(long, default_value_t = 10)]
    pub min_cohort_size: usize,
    /// The path Wald pre-trend test covers event times −W … −1.
    #[arg(long, value_name = "W", default_value_t = 10)]
    pub pretrend_window: usize,
    /// Skip csdid's cell-level Wald pre-test above this many pre-treatment cells.
    #[arg(long, default_value_t = 1500)]
    pub max_wald_cells: usize,
    /// Skip the figures.
    #[arg(long)]
    pub no_figures: bool,
    /// No progress bars and no summary on stdout.
    #[arg(long)]
    pub quiet: bool,
}

impl ProfileArgs {
    /// Arguments with every default, for `panel` and `out`.
    pub fn new(panel: PathBuf, out: PathBuf) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: ProfileArgs,
        }
        let parsed = Wrap::try_parse_from(["memsteer".as_ref(), "--panel".as_ref(), panel.as_os_str()]);
        match parsed {
            Ok(w) => ProfileArgs { out: Some(out), ..w.args },
            Err(e) => unreachable!("default profile arguments always parse: {e}"),
        }
    }

    /// The output directory: `--out`, or `STEM-profile` next to the panel file.
    pub fn out_dir(&self) -> PathBuf {
        if let Some(out) = &self.out {
            return out.clone();
        }
        let mut name = self.panel.file_stem().unwrap_or_default().to_os_string();
        name.push("-profile");
        self.panel.with_file_name(name)
    }

    /// The estimation settings.
    pub fn config(&self) -> ProfileConfig {
        ProfileConfig::default()
            .with_estimator(match self.estimator {
                EstimatorArg::Did => Estimator::Did,
                EstimatorArg::Difference => Estimator::Difference,
            })
            .with_control(match self.control {
                ControlArg::Never => ControlGroup::Never,
                ControlArg::NotYet => ControlGroup::NotYet,
            })
            .with_base_period(match self.base_period {
                BaseArg::Varying => BasePeriod::Varying,
                BaseArg::Universal => BasePeriod::Universal,
            })
            .with_bootstrap(self.bootstrap)
            .with_multiplier(match self.multiplier {
                MultiplierArg::Rademacher => Multiplier::Rademacher,
                MultiplierArg::Mammen => Multiplier::Mammen,
            })
            .with_alpha(self.alpha)
            .with_seed(self.seed)
            .with_band_scope(match self.band {
                BandArg::All => BandScope::All,
                BandArg::Post => BandScope::Post,
            })
            .with_band_method(match self.band_method {
                BandMethodArg::Student => BandMethod::Student,
                BandMethodArg::Csdid => BandMethod::Csdid,
            })
            .with_min_cohort_size(self.min_cohort_size)
            .with_pretrend_window(self.pretrend_window)
            .with_max_wald_cells(self.max_wald_cells)
    }

    /// The column the treatment is read from: `--treatment-col`, else the instance column when a
    /// sequence index is decoded (`--treatment-from-seq-idx` without `--treatment-col`), else
    /// `treatment_step`.
    pub fn treatment_column(&self) -> String {
        match (&self.treatment_col, self.treatment_from_seq_idx) {
            (Some(col), _) => col.clone(),
            (None, Some(_)) => self.instance_col.clone(),
            (None, None) => "treatment_step".into(),
        }
    }

    /// The reader settings.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions::default()
            .with_columns(ColumnMap::new(
                self.instance_col.clone(),
                self.treatment_column(),
                self.checkpoint_col.clone(),
                self.outcome_col.clone(),
            ))
            .with_treatment(match self.treatment_from_seq_idx {
                Some(batch_size) => TreatmentEncoding::FromSeqIdx { batch_size },
                None => TreatmentEncoding::Step,
            })
            .with_negate(self.negate)
            .with_max_step(self.max_step)
            .with_incomplete(if self.drop_incomplete { IncompletePolicy::Drop } else { IncompletePolicy::Error })
    }
}

/// The command-line flag behind a library setting or reader option, for error messages.
fn flag_of(field: &str) -> String {
    match field {
        "band_scope" => "--band".into(),
        "batch_size" => "--treatment-from-seq-idx".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Adds the command line's view (flag names, what to pass) to a library error.
fn with_cli_context(e: anyhow::Error) -> anyhow::Error {
    let hint = if let Some(d) = e.downcast_ref::<DidError>() {
        match d {
            DidError::Config { field, .. } => Some(format!("invalid {}", flag_of(field))),
            DidError::NoNeverTreated => {
                Some("--control never needs never-trained instances; try --control not-yet".into())
            }
            _ => None,
        }
    } else if let Some(p) = e.downcast_ref::<PanelError>() {
        match p {
            PanelError::Incomplete { .. } => {
                Some("pass --drop-incomplete to drop instances that lack checkpoints".into())
            }
            PanelError::TreatmentAfterLastCheckpoint { .. } => {
                Some("use --max-step to cut the panel, or fix the treatment step".into())
            }
            PanelError::InvalidOption { option, .. } => Some(format!("invalid {}", flag_of(option))),
            PanelError::Sparse { .. } => {
                Some("check --instance-col and --checkpoint-col (and --treatment-col / --outcome-col)".into())
            }
            _ => None,
        }
    } else {
        None
    };
    match hint {
        Some(h) => e.context(h),
        None => e,
    }
}

use memsteer_plot::level_label;

/// The result of a profile run.
#[derive(Debug)]
pub struct ProfileOutcome {
    /// The estimates.
    pub profile: Profile,
    /// What the reader reported.
    pub report: ReadReport,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Runs `memsteer profile`.
pub fn run(args: &ProfileArgs) -> Result<ProfileOutcome> {
    let cfg = args.config().validate().map_err(|e| with_cli_context(e.into()))?;
    let bar = Bar::new(args.quiet);
    bar.spin("reading");
    let (panel, report) = memsteer_panel::read::read_panel(&args.panel, &args.read_options())
        .map_err(|e| with_cli_context(e.into()))
        .with_context(|| format!("reading panel {}", args.panel.display()))?;
    memsteer_did::Progress::finish(&bar);
    let profile = memsteer_did::estimate(&panel, &cfg, &bar)
        .map_err(|e| with_cli_context(e.into()))
        .with_context(|| format!("estimating the profile of {}", args.panel.display()))?;

    let out_dir = args.out_dir();
    bar.spin("writing");
    let read = memsteer_did::io::ReadSummary {
        rows: report.rows,
        instances_seen: report.instances_seen,
        dropped_incomplete: report.dropped_incomplete,
        dropped_after_max_step: report.dropped_after_max_step,
        dropped_no_pre_period: profile.n_dropped_no_pre,
        max_step: args.max_step,
        negated: args.negate,
    };
    let panel_name = args.panel.display().to_string();
    let (mut files, diagnostics) =
        memsteer_did::io::write_outputs(&out_dir, &panel_name, &profile, &cfg, (&read, &report.warnings))?;

    if !args.no_figures {
        bar.spin("figures");
        files.extend(memsteer_plot::profile_figures(&profile, &out_dir, args.mark_step, cfg.alpha)?);
    }
    memsteer_did::Progress::finish(&bar);
    if !args.quiet {
        print_summary(&profile, &diagnostics, &out_dir, (cfg.alpha, cfg.band_method));
    }
    Ok(ProfileOutcome { profile, report, files })
}

fn fmt_agg(name: &str, a: &Option<memsteer_did::Aggregate>, level: &str) -> String {
    match a {
        Some(a) => format!(
            "  {name:<14} {:>9.4}  (se {:.4}{}, {level} CI {:.4} to {:.4})",
            a.estimate,
            a.std_error,
            if a.se_source.is_fallback() { " analytic" } else { "" },
            a.ci_lower,
            a.ci_upper
        ),
        None => format!("  {name:<14} not estimable"),
    }
}

fn print_summary(p: &Profile, d: &memsteer_did::Diagnostics, out: &Path, (alpha, bands): (f64, BandMethod)) {
    let level = level_label(alpha);
    let post = p.cells.iter().filter(|c| c.is_post()).count();
    let sig = p.cells.iter().filter(|c| c.is_post() && c.is_significant()).count();
    println!(
        "memorisation profile: {} instances ({} never trained), {} cohorts, {} checkpoints",
        p.n_instances,
        p.n_never,
        p.per_cohort.len(),
        p.checkpoints.len()
    );
    println!(
        "  {post} post-treatment cells, {sig} significant ({level} uniform band, sup-t critical value {:.3}{})",
        p.critical_value,
        match bands {
            BandMethod::Csdid => "",
            _ => " on the normal scale, Student-t per cell",
        }
    );
    println!("{}", fmt_agg("instantaneous", &p.instantaneous, &level));
    println!("{}", fmt_agg("persistent", &p.persistent, &level));
    println!("{}", fmt_agg("residual", &p.residual, &level));
    if let Some(t) = &d.pretrend_sup_t {
        println!("  pre-trend sup-t test: statistic {:.3} over {} cells, p = {:.4}", t.statistic, t.n_cells, t.p_value);
    }
    if let Some(t) = &d.pretrend_path_wald
        && let (Some(s), Some(pv)) = (t.statistic, t.p_value)
    {
        println!("  pre-trend path Wald: χ²({}) = {:.2}, p = {:.4}", t.df, s, pv);
    }
    for w in &d.warnings {
        eprintln!("warning: {w}");
    }
    println!("  wrote {}", out.display());
}
