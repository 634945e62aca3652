//! Trainer throughput: optimizer steps of a small GPT-NeoX on random tokens, in tokens per second.
//! `benches/peers/train_peer.py` times PyTorch on the same model, batch and thread count.
//!
//! `cargo run --release -p memsteer-lm --example train_bench -- THREADS STEPS [BATCH SEQ]`

use std::time::Instant;

use memsteer_lm::train::{Params, TrainConfig, Trainer, tiny_config};

/// CPU seconds of this process (user + system) from `/proc/self/stat` (Linux; `NaN` elsewhere), so that
/// single-thread timings on a shared machine are not inflated by other processes.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name; 100 Hz.
    (ticks(11) + ticks(12)) / 100.0
}

fn refs(b: &[Vec<u32>]) -> Vec<&[u32]> {
    b.iter().map(Vec::as_slice).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let threads = args.first().copied().unwrap_or(1);
    let steps = args.get(1).copied().unwrap_or(10);
    let (batch, seq) = (args.get(2).copied().unwrap_or(8), args.get(3).copied().unwrap_or(128));
    // hidden 128, 4 layers, 4 heads, MLP 512, vocabulary 2048, context 128.
    let mut cfg = tiny_config(2048, 128, 4, 4);
    cfg.max_position_embeddings = seq.max(128);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    Ok(pool.install(|| -> Result<(), memsteer_lm::LmError> {
        let params = Params::init_random(cfg, 1)?;
        let mut trainer = Trainer::new(params, &TrainConfig::new(1e-3, steps + 1))?;
        let mut state = 12345u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2048) as u32
        };
        let batches: Vec<Vec<Vec<u32>>> =
            (0..=steps).map(|_| (0..batch).map(|_| (0..seq).map(|_| next()).collect()).collect()).collect();
        trainer.train_step(&refs(&batches[0]))?; // warm-up step, not timed
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        let mut loss = 0.0;
        for b in &batches[1..] {
            loss = trainer.train_step(&refs(b))?.loss;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{{\"impl\": \"memsteer\", \"threads\": {threads}, \"steps\": {steps}, \"batch\": {batch}, \"seq\": {seq}, \"tokens_per_s\": {:.1}, \"s_per_step\": {:.4}, \"cpu_s_per_step\": {:.4}, \"last_loss\": {loss:.4}}}",
            (steps * batch * seq) as f64 / secs,
            secs / steps as f64,
            cpu / steps as f64
        );
        Ok(())
    })?)
}
