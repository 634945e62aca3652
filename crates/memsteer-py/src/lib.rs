//! `memsteer._native`: the Rust core of memsteer's Python package (`python/memsteer/` wraps it into
//! pandas DataFrames and numpy arrays). Every function calls the same library code as the `memsteer`
//! command line, so results equal the CLI's for the same inputs and seeds; long work runs with the
//! interpreter released (other Python threads keep running).

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use arrow_array::RecordBatch;
use arrow_array::RecordBatchReader;
use arrow_array::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use memsteer_did::compare::{CompareCells, profile_correlation};
use memsteer_did::io::{AttRow, ReadSummary};
use memsteer_did::{BandMethod, BandScope, BasePeriod, ControlGroup, Estimator, Multiplier, ProfileConfig};
use memsteer_panel::read::{ColumnMap, IncompletePolicy, ReadOptions, ReadReport, TreatmentEncoding};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyDict};

mod lm;

/// A Python exception of `memsteer._errors` for a Rust error: `MissingFileError` (a
/// `FileNotFoundError`) when a file is missing somewhere in its causes, `InputError` (a `ValueError`)
/// otherwise; the message is the CLI's.
pub(crate) fn to_py(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PyErr {
    PyErrMessage::from_error(e).into_py()
}

/// `memsteer._errors.<class>(message)`.
pub(crate) fn input_error(class: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let made = py.import("memsteer._errors").and_then(|m| m.getattr(class)).and_then(|c| c.call1((&message,)));
        match made {
            Ok(v) => PyErr::from_value(v),
            Err(e) => e,
        }
    })
}

fn choice<T: Copy>(field: &str, value: &str, options: &[(&str, T)]) -> PyResult<T> {
    options.iter().find(|(name, _)| *name == value).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        input_error("InputError", format!("{field}: expected one of {}, found {value:?}", names.join(", ")))
    })
}

/// What a long call reports while it runs, and how it is stopped: the calling thread polls it with
/// the interpreter held (Ctrl-C sets `cancel`; with `progress` it writes the bar to `sys.stderr`, so
/// notebooks show it), the work checks `cancel` at its progress points.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    cancel: AtomicBool,
    step: Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
}

/// The payload that unwinds a cancelled call (without the panic hook's message).
struct Cancelled;

impl Watch {
    /// Stops the work here when the caller pressed Ctrl-C.
    pub(crate) fn check(&self) {
        if self.cancel.load(Ordering::Relaxed) {
            std::panic::resume_unwind(Box::new(Cancelled));
        }
    }

    /// A step named `name` with `total` units begins.
    pub(crate) fn begin(&self, name: &str, total: u64) {
        if let Ok(mut s) = self.step.lock() {
            name.clone_into(&mut s);
        }
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.check();
    }

    /// `n` more units are done.
    pub(crate) fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.check();
    }

    fn line(&self) -> String {
        let step = self.step.lock().map(|s| s.clone()).unwrap_or_default();
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed).max(1));
        let filled = (done.min(total) * 30 / total) as usize;
        format!("\r{step:>12} [{}{}] {done}/{total}", "=".repeat(filled), " ".repeat(30 - filled))
    }
}

impl memsteer_did::Progress for Watch {
    fn start(&self, name: &str, total: u64) {
        self.begin(name, total);
    }
    fn advance(&self, n: u64) {
        self.add(n);
    }
    fn finish(&self) {
        self.check();
    }
}

/// Runs `f` on `threads` threads (all cores when `None`) with the interpreter released, while the
/// calling thread watches for Ctrl-C (a `KeyboardInterrupt` within a tenth of a second of `f`'s next
/// progress point) and, with `progress`, draws a progress bar on `sys.stderr`.
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    (threads, progress): (Option<usize>, bool),
    f: impl FnOnce(&Watch) -> Result<T, PyErrMessage> + Send,
) -> PyResult<T> {
    if let Some(n) = threads
        && n > MAX_THREADS
    {
        return Err(input_error("InputError", format!("threads: expected at most {MAX_THREADS}, found {n}")));
    }
    let (joined, interrupted) = py.detach(move || {
        let watch = Watch::default();
        let mut interrupted: Option<PyErr> = None;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let joined = std::thread::scope(|scope| {
            let work = scope.spawn(|| {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match threads {
                    Some(0) => Err(PyErrMessage::input("threads: expected at least 1, found 0")),
                    Some(n) => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
                        Ok(pool) => pool.install(|| f(&watch)),
                        Err(e) => Err(PyErrMessage::input(format!("threads: {e}"))),
                    },
                    None => f(&watch),
                }));
                let _ = done_tx.send(());
                out
            });
            let mut drawn = false;
            // A short call returns as soon as it is done; a long one is polled every 50 ms.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(std::time::Duration::from_millis(50))
            {
                Python::attach(|py| {
                    if interrupted.is_none()
                        && let Err(e) = py.check_signals()
                    {
                        watch.cancel.store(true, Ordering::Relaxed);
                        interrupted = Some(e);
                    }
                    if progress {
                        let _ = py.import("sys").and_then(|s| s.getattr("stderr")).and_then(|e| {
                            e.call_method1("write", (watch.line(),))?;
                            e.call_method0("flush")
                        });
                        drawn = true;
                    }
                });
            }
            if drawn {
                Python::attach(|py| {
                    let _ = py
                        .import("sys")
                        .and_then(|s| s.getattr("stderr"))
                        .and_then(|e| e.call_method1("write", ("\n",)));
                });
            }
            work.join()
        });
        (joined, interrupted)
    });
    // An interrupt the watcher took wins, whether or not the work reached a check point after it.
    if let Some(e) = interrupted {
        return Err(e);
    }
    match joined {
        Ok(Ok(result)) => result.map_err(PyErrMessage::into_py),
        Ok(Err(payload)) | Err(payload) => Err(internal_error(payload.as_ref())),
    }
}

/// Most worker threads a call may ask for.
const MAX_THREADS: usize = 1024;

/// A panic (a bug, not bad input) as a `MemsteerError` saying so.
fn internal_error(payload: &(dyn std::any::Any + Send)) -> PyErr {
    let what = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    input_error("MemsteerError", format!("internal error (please report it): {what}"))
}

/// An error made without the interpreter, raised once it is held again.
pub(crate) struct PyErrMessage {
    missing: bool,
    message: String,
}

impl PyErrMessage {
    pub(crate) fn input(message: impl Into<String>) -> Self {
        Self { missing: false, message: message.into() }
    }

    pub(crate) fn from_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        let e = e.into();
        let mut missing = false;
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
        while let Some(c) = cause {
            if c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) {
                missing = true;
            }
            cause = c.source();
        }
        Self { missing, message: e.to_string() }
    }

    /// Says what was being done: `"{what}: {message}"`.
    pub(crate) fn prefix(&mut self, what: &str) {
        self.message = format!("{what}: {}", self.message);
    }

    fn into_py(self) -> PyErr {
        input_error(if self.missing { "MissingFileError" } else { "InputError" }, self.message)
    }
}

/// Record batches as read from a stream.
type Batches = Vec<Result<RecordBatch, String>>;

/// The record batches of an Arrow C stream (the `__arrow_c_stream__` PyCapsule of pandas, polars,
/// pyarrow, duckdb …), moved out of the capsule, and their column names.
#[allow(unsafe_code)]
fn arrow_stream(capsule: &Bound<'_, PyCapsule>) -> PyResult<(Vec<String>, Batches)> {
    let ptr = capsule
        .pointer_checked(Some(c"arrow_array_stream"))
        .map_err(|e| input_error("InputError", format!("panel: expected an Arrow C stream capsule ({e})")))?
        .as_ptr()
        .cast::<FFI_ArrowArrayStream>();
    // SAFETY: the capsule is named `arrow_array_stream` (checked above), so by the Arrow PyCapsule interface it holds
    // a valid `ArrowArrayStream`; `from_raw` moves it out and leaves a released stream behind, which the
    // capsule's destructor then skips, as the interface specifies.
    let stream = unsafe { FFI_ArrowArrayStream::from_raw(ptr) };
    let reader = RecordBatchStreamReader::try_new(stream)
        .map_err(|e| input_error("InputError", format!("panel: reading the Arrow stream's schema: {e}")))?;
    let names: Vec<String> = reader.schema().fields().iter().map(|f| f.name().clone()).collect();
    // The stream may not be read on after an error.
    let mut batches = Vec::new();
    for b in reader {
        let failed = b.is_err();
        batches.push(b.map_err(|e| e.to_string()));
        if failed {
            break;
        }
    }
    Ok((names, batches))
}

/// A memorisation profile with everything the CLI writes about it.
#[pyclass(module = "memsteer._native", frozen)]
struct Profile {
    profile: memsteer_did::Profile,
    cfg: ProfileConfig,
    read: ReadSummary,
    warnings: Vec<String>,
    source: String,
    /// Seconds spent handing the panel over (reading the file or the Arrow stream into a panel).
    #[pyo3(get)]
    handover_seconds: f64,
    /// Seconds spent estimating.
    #[pyo3(get)]
    estimate_seconds: f64,
}

#[pymethods]
impl Profile {
    /// The columns of `att.csv`: name → list.
    fn att_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.profile.cells;
        let d = PyDict::new(py);
        d.set_item("cohort", c.iter().map(|x| x.cohort).collect::<Vec<_>>())?;
        d.set_item("checkpoint", c.iter().map(|x| x.checkpoint).collect::<Vec<_>>())?;
        d.set_item("event_time", c.iter().map(|x| x.event_time).collect::<Vec<_>>())?;
        d.set_item("estimate", c.iter().map(|x| x.estimate).collect::<Vec<_>>())?;
        d.set_item("std_error", c.iter().map(|x| x.std_error).collect::<Vec<_>>())?;
        d.set_item("ci_lower", c.iter().map(|x| x.ci_lower).collect::<Vec<_>>())?;
        d.set_item("ci_upper", c.iter().map(|x| x.ci_upper).collect::<Vec<_>>())?;
        d.set_item("band_lower", c.iter().map(|x| x.band_lower).collect::<Vec<_>>())?;
        d.set_item("band_upper", c.iter().map(|x| x.band_upper).collect::<Vec<_>>())?;
        d.set_item("n_treated", c.iter().map(|x| x.n_treated).collect::<Vec<_>>())?;
        d.set_item("n_control", c.iter().map(|x| x.n_control).collect::<Vec<_>>())?;
        Ok(d)
    }

    /// The columns of `path.csv`: name → list.
    fn path_columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = &self.profile.path;
        let d = PyDict::new(py);
        d.set_item("event_time", p.iter().map(|x| x.event_time).collect::<Vec<_>>())?;
        d.set_item("estimate", p.iter().map(|x| x.estimate).collect::<Vec<_>>())?;
        d.set_item("std_error", p.iter().map(|x| x.std_error).collect::<Vec<_>>())?;
        d.set_item("ci_lower", p.iter().map(|x| x.ci_lower).collect::<Vec<_>>())?;
        d.set_item("ci_upper", p.iter().map(|x| x.ci_upper).collect::<Vec<_>>())?;
        d.set_item("band_lower", p.iter().map(|x| x.band_lower).collect::<Vec<_>>())?;
        d.set_item("band_upper", p.iter().map(|x| x.band_upper).collect::<Vec<_>>())?;
        Ok(d)
    }

    /// `summary.json`'s text.
    fn summary_json(&self) -> String {
        memsteer_did::io::summary_json(&self.source, &self.profile, &self.cfg, &self.read)
    }

    /// `diagnostics.json`'s text.
    fn diagnostics_json(&self) -> PyResult<String> {
        let d = memsteer_did::io::diagnostics_with(&self.profile, &self.warnings);
        serde_json::to_string_pretty(&d).map_err(to_py)
    }

    /// Writes the CLI's files (and figures unless `figures` is false) into `dir`, each atomically;
    /// returns their paths.
    #[pyo3(signature = (dir, figures = true, mark_step = None))]
    fn save(&self, py: Python<'_>, dir: PathBuf, figures: bool, mark_step: Option<u64>) -> PyResult<Vec<String>> {
        run_detached(py, (None, false), |_| {
            let (mut files, _) = memsteer_did::io::write_outputs(
                &dir,
                &self.source,
                &self.profile,
                &self.cfg,
                (&self.read, &self.warnings),
            )
            .map_err(PyErrMessage::from_error)?;
            if figures {
                files.extend(
                    memsteer_plot::profile_figures(&self.profile, &dir, mark_step, self.cfg.alpha)
                        .map_err(PyErrMessage::from_error)?,
                );
            }
            Ok(files.into_iter().map(|p| p.display().to_string()).collect())
        })
    }
}

/// The panel: a path (CSV or Parquet) or an Arrow C stream capsule.
enum PanelInput {
    Path(PathBuf),
    Stream(Vec<String>, Batches),
}

/// `memsteer.profile`: reads the panel (a path, or an Arrow C stream capsule with `source` naming it
/// in errors) with the CLI's column adapters, estimates the profile with the CLI's settings.
#[pyfunction]
#[pyo3(signature = (panel, source, *, instance, treatment, checkpoint, outcome, treatment_from_seq_idx, negate,
    max_step, drop_incomplete, estimator, control, base_period, bootstrap, multiplier, band, band_method, alpha,
    seed, min_cohort_size, pretrend_window, max_wald_cells, threads, progress = false))]
#[allow(clippy::too_many_arguments)]
fn profile(
    py: Python<'_>,
    panel: &Bound<'_, PyAny>,
    source: String,
    instance: String,
    treatment: Option<String>,
    checkpoint: String,
    outcome: String,
    treatment_from_seq_idx: Option<u64>,
    negate: bool,
    max_step: Option<u64>,
    drop_incomplete: bool,
    estimator: &str,
    control: &str,
    base_period: &str,
    bootstrap: usize,
    multiplier: &str,
    band: &str,
    band_method: &str,
    alpha: f64,
    seed: u64,
    min_cohort_size: usize,
    pretrend_window: usize,
    max_wald_cells: usize,
    threads: Option<usize>,
    progress: bool,
) -> PyResult<Profile> {
    let cfg = ProfileConfig::default()
        .with_estimator(choice(
            "estimator",
            estimator,
            &[("did", Estimator::Did), ("difference", Estimator::Difference)],
        )?)
        .with_control(choice("control", control, &[("never", ControlGroup::Never), ("not-yet", ControlGroup::NotYet)])?)
        .with_base_period(choice(
            "base_period",
            base_period,
            &[("varying", BasePeriod::Varying), ("universal", BasePeriod::Universal)],
        )?)
        .with_bootstrap(bootstrap)
        .with_multiplier(choice(
            "multiplier",
            multiplier,
            &[("rademacher", Multiplier::Rademacher), ("mammen", Multiplier::Mammen)],
        )?)
        .with_alpha(alpha)
        .with_seed(seed)
        .with_band_scope(choice("band", band, &[("all", BandScope::All), ("post", BandScope::Post)])?)
        .with_band_method(choice(
            "band_method",
            band_method,
            &[("student", BandMethod::Student), ("csdid", BandMethod::Csdid)],
        )?)
        .with_min_cohort_size(min_cohort_size)
        .with_pretrend_window(pretrend_window)
        .with_max_wald_cells(max_wald_cells);
    let valid = cfg.clone().validate().map_err(to_py)?;
    // As the CLI: with `treatment_from_seq_idx` the treatment is read from the instance column.
    let treatment_col = match (treatment, treatment_from_seq_idx) {
        (Some(col), _) => col,
        (None, Some(_)) => instance.clone(),
        (None, None) => "treatment_step".into(),
    };
    let options = ReadOptions::default()
        .with_columns(ColumnMap::new(instance, treatment_col, checkpoint, outcome))
        .with_treatment(match treatment_from_seq_idx {
            Some(batch_size) => TreatmentEncoding::FromSeqIdx { batch_size },
            None => TreatmentEncoding::Step,
        })
        .with_negate(negate)
        .with_max_step(max_step)
        .with_incomplete(if drop_incomplete { IncompletePolicy::Drop } else { IncompletePolicy::Error });
    let start = Instant::now();
    let input = match panel.cast::<PyCapsule>() {
        Ok(capsule) => {
            // A malformed stream can trip an assertion in arrow's import: an error, not a crash.
            let (names, batches) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| arrow_stream(capsule)))
                .map_err(|p| internal_error(p.as_ref()))??;
            PanelInput::Stream(names, batches)
        }
        Err(_) => PanelInput::Path(panel.extract::<PathBuf>()?),
    };
    run_detached(py, (threads, progress), move |watch| {
        let read = |r: Result<(memsteer_panel::Panel, ReadReport), memsteer_panel::PanelError>| {
            r.map_err(PyErrMessage::from_error)
        };
        let (panel, report) = match &input {
            PanelInput::Path(p) => read(memsteer_panel::read::read_panel(p, &options))?,
            PanelInput::Stream(names, batches) => {
                read(memsteer_panel::read::read_batches(names, batches.iter().cloned(), &source, &options))?
            }
        };
        let handover_seconds = start.elapsed().as_secs_f64();
        let started = Instant::now();
        let profile = memsteer_did::estimate(&panel, &valid, watch).map_err(PyErrMessage::from_error)?;
        let estimate_seconds = started.elapsed().as_secs_f64();
        let read = ReadSummary {
            rows: report.rows,
            instances_seen: report.instances_seen,
            dropped_incomplete: report.dropped_incomplete,
            dropped_after_max_step: report.dropped_after_max_step,
            dropped_no_pre_period: profile.n_dropped_no_pre,
            max_step,
            negated: negate,
        };
        Ok(Profile { profile, cfg, read, warnings: report.warnings, source, handover_seconds, estimate_seconds })
    })
}

/// `memsteer.compare`: Pearson's r and the number of shared post-treatment cells for every ordered
/// pair of profiles (row-major), as `memsteer compare` computes them.
#[pyfunction]
#[pyo3(signature = (profiles, significant_only = false))]
fn compare(profiles: Vec<PyRef<'_, Profile>>, significant_only: bool) -> Vec<(f64, usize)> {
    let rows: Vec<Vec<AttRow>> = profiles
        .iter()
        .map(|p| {
            p.profile
                .cells
                .iter()
                .map(|c| AttRow::new(c.cohort, c.checkpoint, c.event_time, c.estimate, c.band_lower, c.band_upper))
                .collect()
        })
        .collect();
    let cells = if significant_only { CompareCells::Significant } else { CompareCells::All };
    let mut out = Vec::with_capacity(rows.len() * rows.len());
    for a in &rows {
        for b in &rows {
            let c = profile_correlation(a, b, cells);
            out.push((c.r, c.n));
        }
    }
    out
}

/// `memsteer.hmm.theorem2`: the report of `memsteer hmm theorem2 --json`, as JSON text.
#[pyfunction]
#[pyo3(signature = (seed, states, conditions, vocab, length, samples))]
fn theorem2(
    py: Python<'_>,
    seed: u64,
    states: usize,
    conditions: usize,
    vocab: usize,
    length: usize,
    samples: usize,
) -> PyResult<String> {
    run_detached(py, (None, false), |_| {
        let report = memsteer_hmm::theorem2::check_theorem2(&memsteer_hmm::theorem2::Theorem2Config {
            seed,
            semantic_states: states,
            condition_states: conditions,
            vocab,
            length,
            samples,
            sample_length: 200,
        })
        .map_err(PyErrMessage::from_error)?;
        serde_json::to_string(&report).map_err(PyErrMessage::from_error)
    })
}

/// `memsteer.hmm.simulate`: `memsteer hmm simulate`'s files (panel.csv, truth.csv, simulation.json)
/// written into `out`; returns their paths.
#[pyfunction]
#[pyo3(signature = (out, seed, states, vocab, length, batch_size, steps, validation, lr, validation_shift,
    counterfactual, replicates))]
#[allow(clippy::too_many_arguments)]
fn simulate(
    py: Python<'_>,
    out: PathBuf,
    seed: u64,
    states: usize,
    vocab: usize,
    length: usize,
    batch_size: usize,
    steps: usize,
    validation: usize,
    lr: f64,
    validation_shift: f64,
    counterfactual: &str,
    replicates: usize,
) -> PyResult<Vec<String>> {
    use memsteer_hmm::simulate::{Counterfactual, SimulationConfig};
    let counterfactual = choice(
        "counterfactual",
        counterfactual,
        &[("substitute", Counterfactual::Substitute), ("remove", Counterfactual::Remove)],
    )?;
    let cfg = SimulationConfig {
        seed,
        states,
        vocab,
        length,
        batch_size,
        steps,
        validation,
        learning_rate: lr,
        validation_shift,
        counterfactual,
        replicates,
        ..SimulationConfig::default()
    };
    run_detached(py, (None, false), |_| {
        let sim = memsteer_hmm::simulate::simulate(&cfg).map_err(PyErrMessage::from_error)?;
        let files = sim.write(&out, &cfg).map_err(PyErrMessage::from_error)?;
        Ok(files.into_iter().map(|p| p.display().to_string()).collect())
    })
}

/// Little-endian `f64` bytes (numpy reads them with `frombuffer` without a copy per element).
pub(crate) fn f64_bytes<'py>(py: Python<'py>, values: impl IntoIterator<Item = f64>) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = values.into_iter().flat_map(f64::to_le_bytes).collect();
    PyBytes::new(py, &bytes)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Profile>()?;
    m.add_function(wrap_pyfunction!(profile, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(theorem2, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    lm::register(m)?;
    Ok(())
}
