"""How long handing a panel over to memsteer takes, against the estimation itself.

Usage: python crates/memsteer-py/bench/handover.py PANEL.csv [--threads 2] [--repeats 3]
(a 1,000,000-row panel: `cargo xtask synth --out panel.csv --cohorts 95 --per-cohort 100 --validation 500
--checkpoints 100`). Build the extension in release mode first (`maturin develop --release`).
Prints the median seconds of the hand-over (the Arrow stream or file read into a panel) and of the
estimation (1,000 bootstrap draws), per input kind.
"""

import argparse
import statistics
import time

import pandas as pd
import polars as pl
import pyarrow as pa

import memsteer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("panel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    frame = pd.read_csv(a.panel)
    frame["treatment_step"] = pd.to_numeric(frame["treatment_step"], errors="coerce")
    inputs = {
        "CSV file": a.panel,
        "pandas DataFrame": frame,
        "polars DataFrame": pl.from_pandas(frame),
        "pyarrow Table": pa.Table.from_pandas(frame, preserve_index=False),
    }
    print(f"{len(frame):,} rows, {frame['instance_id'].nunique():,} instances, threads {a.threads}, "
          f"median of {a.repeats}")
    print(f"{'input':<18} {'call s':>8} {'hand-over s':>12} {'estimate s':>11} {'hand-over share':>16}")
    for name, panel in inputs.items():
        calls, hand, est = [], [], []
        for _ in range(a.repeats):
            start = time.perf_counter()
            p = memsteer.profile(panel, bootstrap=1000, threads=a.threads)
            calls.append(time.perf_counter() - start)
            hand.append(p.timings["handover"])
            est.append(p.timings["estimate"])
        c, h, e = statistics.median(calls), statistics.median(hand), statistics.median(est)
        print(f"{name:<18} {c:>8.3f} {h:>12.3f} {e:>11.3f} {h / c:>15.1%}")


if __name__ == "__main__":
    main()
