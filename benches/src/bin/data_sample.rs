//! Sampling instances from a Pythia-sized data order: an indexed dataset of 10⁸ rows of 2,049 uint16
//! tokens (the index written in full, 2.0 GB; row `r` points at stored row `r mod 250,000`, so `.bin` is
//! 1 GB of real tokens and every draw reads its own pages), 100 steps × 1,000 instances drawn and written
//! as JSON lines with `memsteer_lm::data::sample_to_file`. Prints the time and the peak resident
//! memory: only the pages of the drawn rows are read, and instances are written as they are drawn.
//!
//! `cargo run -p memsteer-benches --release --bin memsteer-data-sample -- [DIR] [ROWS]` (default
//! `target/bench-data`, 100,000,000 rows); the files are made once and reused.

use std::io::Write;
use std::path::PathBuf;

use memsteer_lm::data::{IndexedDataset, Sampling, Steps, sample_to_file};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("target/bench-data", String::as_str));
    let rows: u64 = args.get(2).map_or(Ok(100_000_000), |r| r.parse())?;
    const LEN: usize = 2049;
    std::fs::create_dir_all(&dir)?;
    let prefix = dir.join(format!("rows-{rows}"));
    let idx = prefix.with_extension("idx");
    if !idx.exists() {
        let t = std::time::Instant::now();
        const STORED: u64 = 250_000;
        let mut bin = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(prefix.with_extension("bin"))?);
        let mut rng = memsteer_panel::rng::SplitMix64::new(1);
        for _ in 0..STORED * LEN as u64 {
            bin.write_all(&(rng.below(50_000) as u16 + 1).to_le_bytes())?;
        }
        bin.flush()?;
        let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&idx)?);
        f.write_all(b"MMIDIDX\x00\x00")?;
        f.write_all(&1u64.to_le_bytes())?;
        f.write_all(&[8])?;
        f.write_all(&rows.to_le_bytes())?;
        f.write_all(&(rows + 1).to_le_bytes())?;
        let size = (LEN as i32).to_le_bytes();
        for _ in 0..rows {
            f.write_all(&size)?;
        }
        for r in 0..rows {
            f.write_all(&((r % STORED) * 2 * LEN as u64).to_le_bytes())?;
        }
        // The document index (not read when sampling), as zeros.
        let zeros = vec![0u8; 1 << 22];
        let mut left = 8 * (rows + 1);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        eprintln!("wrote {} ({:.1} s)", idx.display(), t.elapsed().as_secs_f64());
    }
    let before = peak_rss_mib();
    let t = std::time::Instant::now();
    let d = IndexedDataset::open(&prefix)?.with_seq_len(LEN);
    let batch = 1024u64;
    let last = rows / batch;
    let sampling = Sampling {
        steps: Steps { first: 1, last, stride: (last / 100).max(1) },
        per_step: 1000,
        validation: 0,
        validation_steps: None,
        batch_size: batch,
        epoch_steps: None,
        truncate: None,
        seed: 1,
    };
    // The instances as `memsteer instances` writes them, to a file beside the data.
    let out = sample_to_file(&d, &sampling, &dir.join("sampled.jsonl"), &mut |_| {})?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "sampled {} instances of {LEN} tokens from {rows} rows in {secs:.2} s; peak resident memory {:.0} MiB (before opening {:.0} MiB; the index is {:.0} MiB)",
        out.treated,
        peak_rss_mib(),
        before,
        std::fs::metadata(&idx)?.len() as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
