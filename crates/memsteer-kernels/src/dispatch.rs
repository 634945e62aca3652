//! Which CPU kernels run: detected once per process from the CPU's features (and, for AMX, the
//! operating system's permission), or forced with `MEMSTEER_CPU_KERNELS` for tests and comparisons.
//!
//! The levels are ordered; a level uses its own kernels and those of every level below it. They
//! choose the bf16 products ([`crate::bf16`]); f32 products go through `matrixmultiply`, which picks
//! its own AVX-512, FMA or AVX kernels at run time whatever the level (measured here: its AVX-512
//! kernel runs on the CPUs that have it).
//!
//! | level      | bf16 products                              | `--compute auto` on bf16/f16 checkpoints |
//! |------------|--------------------------------------------|------------------------------------------|
//! | `portable` | portable Rust (any CPU)                    | f32                                      |
//! | `avx2`     | portable Rust                              | f32                                      |
//! | `avx512`   | portable Rust                              | f32                                      |
//! | `bf16`     | AVX-512 BF16 `vdpbf16ps`, f32 accumulators  | f32 (no faster here; `bf16` opts in)     |
//! | `amx`      | AMX tiles (`tdpbf16ps`), f32 accumulators   | bf16                                     |
//!
//! Forcing a level the CPU lacks is an error naming what it has; forcing a lower one always works.

use std::sync::OnceLock;

use crate::{KernelError, Result};

/// A kernel level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuKernels {
    /// No memsteer SIMD kernels.
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F and BW.
    Avx512,
    /// AVX-512 BF16 dot products (`vdpbf16ps`) for bf16 products.
    Bf16,
    /// AMX tiles (`tdpbf16ps`) for bf16 products.
    Amx,
}

/// Every level, lowest first.
pub const ALL_LEVELS: [CpuKernels; 5] =
    [CpuKernels::Portable, CpuKernels::Avx2, CpuKernels::Avx512, CpuKernels::Bf16, CpuKernels::Amx];

impl CpuKernels {
    /// The name `MEMSTEER_CPU_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Portable => "portable",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Bf16 => "bf16",
            CpuKernels::Amx => "amx",
        }
    }

    /// Parses a name of [`CpuKernels::name`].
    pub fn parse(name: &str) -> Option<Self> {
        ALL_LEVELS.into_iter().find(|l| l.name() == name.trim().to_ascii_lowercase())
    }

    /// The highest level this CPU and operating system support (computed once).
    pub fn detected() -> Self {
        static DETECTED: OnceLock<CpuKernels> = OnceLock::new();
        *DETECTED.get_or_init(detect)
    }

    /// Whether bf16 products on this level are measured faster than f32 ones, so that `--compute
    /// auto` picks them: AMX only (2.5× the f32 path on Pythia-70M, docs/performance.md). The
    /// AVX-512 BF16 kernel measured no faster than f32 products on the CPU it was tuned on, so on
    /// `bf16` CPUs `auto` stays f32 and `--compute bf16` opts in.
    pub fn bf16_pays_off(self) -> bool {
        self >= CpuKernels::Amx
    }
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuKernels {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return CpuKernels::Portable;
    }
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
        return CpuKernels::Avx2;
    }
    if !is_x86_feature_detected!("avx512bf16") {
        return CpuKernels::Avx512;
    }
    if crate::x86::amx_available() { CpuKernels::Amx } else { CpuKernels::Bf16 }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuKernels {
    CpuKernels::Portable
}

/// The level this process runs: `MEMSTEER_CPU_KERNELS` when set (an unknown name, or a level above
/// [`CpuKernels::detected`], is an error saying what is available), else the detected one. Read
/// once per process.
pub fn cpu_kernels() -> Result<CpuKernels> {
    static SELECTED: OnceLock<std::result::Result<CpuKernels, String>> = OnceLock::new();
    SELECTED
        .get_or_init(|| select(std::env::var("MEMSTEER_CPU_KERNELS").ok().as_deref(), CpuKernels::detected()))
        .clone()
        .map_err(|message| KernelError::Unsupported { what: "MEMSTEER_CPU_KERNELS", message })
}

/// The choice [`cpu_kernels`] makes for a requested name and a detected level.
pub(crate) fn select(requested: Option<&str>, detected: CpuKernels) -> std::result::Result<CpuKernels, String> {
    let Some(name) = requested.filter(|s| !s.trim().is_empty()) else { return Ok(detected) };
    let names = ALL_LEVELS.map(CpuKernels::name).join(", ");
    let level =
        CpuKernels::parse(name).ok_or_else(|| format!("unknown kernel level {name:?}; expected one of {names}"))?;
    if level > detected {
        return Err(format!(
            "{level} kernels were requested but this CPU supports up to {detected} ({})",
            cpu_summary()
        ));
    }
    Ok(level)
}

/// The CPU's name and the features memsteer's kernels look at, for logs and benchmark reports.
pub fn cpu_summary() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}; features: {}", features().join(" "))
}

#[cfg(target_arch = "x86_64")]
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    for (name, on) in [
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bw", is_x86_feature_detected!("avx512bw")),
        ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ("avx512fp16", is_x86_feature_detected!("avx512fp16")),
        ("amx-bf16", crate::x86::amx_cpuid()),
        ("amx-permitted", crate::x86::amx_available()),
    ] {
        if on {
            f.push(name);
        }
    }
    if f.is_empty() {
        f.push("none");
    }
    f
}

#[cfg(not(target_arch = "x86_64"))]
fn features() -> Vec<&'static str> {
    vec!["portable only"]
}

/// One line for `--verbose` logs: the level in use, how it was chosen, and the CPU.
pub fn describe() -> String {
    let detected = CpuKernels::detected();
    match cpu_kernels() {
        Ok(l) if l == detected => format!("CPU kernels: {l} (detected; {})", cpu_summary()),
        Ok(l) => format!("CPU kernels: {l} (MEMSTEER_CPU_KERNELS; detected {detected}; {})", cpu_summary()),
        Err(e) => format!("CPU kernels: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_the_request_and_refuses_what_the_cpu_lacks() {
        assert_eq!(select(None, CpuKernels::Bf16), Ok(CpuKernels::Bf16));
        assert_eq!(select(Some(" "), CpuKernels::Avx2), Ok(CpuKernels::Avx2));
        assert_eq!(select(Some("portable"), CpuKernels::Amx), Ok(CpuKernels::Portable));
        assert_eq!(select(Some("AVX512"), CpuKernels::Amx), Ok(CpuKernels::Avx512));
        let e = select(Some("amx"), CpuKernels::Avx2).unwrap_err();
        assert!(e.contains("amx kernels were requested but this CPU supports up to avx2"), "{e}");
        let e = select(Some("neon"), CpuKernels::Avx2).unwrap_err();
        assert!(e.contains("unknown kernel level \"neon\"") && e.contains("portable, avx2, avx512, bf16, amx"), "{e}");
    }

    #[test]
    fn levels_are_ordered_and_named() {
        for w in ALL_LEVELS.windows(2) {
            assert!(w[0] < w[1]);
        }
        for l in ALL_LEVELS {
            assert_eq!(CpuKernels::parse(l.name()), Some(l));
        }
    }
}
