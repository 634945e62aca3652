//! Progress bars on stderr (hidden when stderr is not a terminal).

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A [`memsteer_did::Progress`] that draws one bar per step.
#[derive(Debug, Default)]
pub(crate) struct Bar {
    current: Mutex<Option<ProgressBar>>,
    quiet: bool,
    /// With `MEMSTEER_TIMINGS` set, each step's wall time goes to stderr.
    timings: Option<Mutex<Option<(String, std::time::Instant)>>>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let timings = std::env::var_os("MEMSTEER_TIMINGS").map(|_| Mutex::new(None));
        Self { current: Mutex::new(None), quiet, timings }
    }

    fn time_step(&self, next: Option<&str>) {
        if let Some(t) = &self.timings
            && let Ok(mut guard) = t.lock()
        {
            if let Some((name, start)) = guard.take() {
                eprintln!("timing: {name} {:.3} s", start.elapsed().as_secs_f64());
            }
            *guard = next.map(|n| (n.to_string(), std::time::Instant::now()));
        }
    }

    fn with(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        if let Ok(mut guard) = self.current.lock() {
            f(&mut guard);
        }
    }

    /// A spinner for a step of unknown length.
    pub fn spin(&self, name: &str) {
        self.start_inner(name, None);
    }

    fn start_inner(&self, name: &str, total: Option<u64>) {
        self.time_step(Some(name));
        if self.quiet {
            return;
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => {
                let b = ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{prefix:>12} {spinner} {elapsed_precise}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b.enable_steady_tick(Duration::from_millis(120));
                b
            }
        };
        bar.set_prefix(name.to_string());
        self.with(|c| {
            if let Some(old) = c.replace(bar) {
                old.finish_and_clear();
            }
        });
    }
}

impl memsteer_did::Progress for Bar {
    fn start(&self, name: &str, total: u64) {
        self.start_inner(name, (total > 1).then_some(total));
    }
    fn advance(&self, n: u64) {
        self.with(|c| {
            if let Some(b) = c {
                b.inc(n);
            }
        });
    }
    fn finish(&self) {
        self.time_step(None);
        self.with(|c| {
            if let Some(b) = c.take() {
                b.finish_and_clear();
            }
        });
    }
}
