//! Progress bars on stderr (hidden when stderr is not a terminal).

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A [`memsteer_did::Progress`] that draws one bar per step.
#[derive(Debug, Default)]
pub(crate) struct Bar {
    current: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        Self { current: Mutex::new(None), quiet }
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
        self.with(|c| {
            if let Some(b) = c.take() {
                b.finish_and_clear();
            }
        });
    }
}
