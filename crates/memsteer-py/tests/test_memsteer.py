"""memsteer from Python against the command line: same numbers from the same inputs."""

import json
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import polars as pl
import pytest

import memsteer
from conftest import FIXTURES

PANEL = FIXTURES / "csdid" / "panel_a.csv"


# pandas 3 parses floats exactly by default (and deprecates asking for it).
EXACT = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def read_att(path):
    return pd.read_csv(path, **EXACT)


@pytest.fixture(scope="module")
def cli_profile(tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("cli") / "a"
    cli("profile", "--panel", str(PANEL), "--out", str(out), "--bootstrap", "200", "--no-figures", "--quiet")
    return out


def test_profile_of_a_csv_equals_the_cli_exactly(cli_profile, tmp_path):
    p = memsteer.profile(str(PANEL), bootstrap=200)
    want = read_att(cli_profile / "att.csv")
    pd.testing.assert_frame_equal(p.att, want, check_exact=True, check_dtype=False)
    pd.testing.assert_frame_equal(p.path, read_att(cli_profile / "path.csv"), check_exact=True, check_dtype=False)
    assert p.summary == json.loads((cli_profile / "summary.json").read_text())
    assert p.diagnostics == json.loads((cli_profile / "diagnostics.json").read_text())
    files = p.save(tmp_path / "py", figures=False)
    assert sorted(f.split("/")[-1] for f in files) == ["att.csv", "diagnostics.json", "path.csv", "summary.json"]
    for name in ["att.csv", "path.csv", "summary.json", "diagnostics.json"]:
        assert (tmp_path / "py" / name).read_bytes() == (cli_profile / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["pandas", "polars", "pyarrow", "parquet"])
def test_every_table_kind_gives_the_same_profile(kind, cli_profile, tmp_path):
    frame = pd.read_csv(PANEL)
    if kind == "pandas":
        panel = frame
    elif kind == "polars":
        panel = pl.read_csv(PANEL, infer_schema_length=None)
    elif kind == "pyarrow":
        panel = pacsv.read_csv(PANEL)
    else:
        panel = tmp_path / "panel.parquet"
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), panel)
    p = memsteer.profile(panel, bootstrap=200)
    pd.testing.assert_frame_equal(p.att, read_att(cli_profile / "att.csv"), check_exact=True, check_dtype=False)
    assert p.summary["n_instances"] == 309


def test_pandas_nan_marks_never_trained_and_float_steps_are_read(cli_profile):
    # As pandas reads the panel when never-trained rows are empty: a float column with NaN.
    frame = pd.read_csv(PANEL)
    frame["treatment_step"] = pd.to_numeric(frame["treatment_step"], errors="coerce")
    frame["checkpoint_step"] = frame["checkpoint_step"].astype("float64")
    assert frame["treatment_step"].isna().sum() > 0
    p = memsteer.profile(frame, bootstrap=200)
    pd.testing.assert_frame_equal(p.att, read_att(cli_profile / "att.csv"), check_exact=True, check_dtype=False)
    frame.loc[3, "checkpoint_step"] = 1.5
    with pytest.raises(memsteer.InputError, match="row 4"):
        memsteer.profile(frame, bootstrap=200)


def test_categorical_columns_are_read_as_their_values(cli_profile):
    want = read_att(cli_profile / "att.csv")
    frame = pd.read_csv(PANEL)
    frame["instance_id"] = frame["instance_id"].astype("category")
    frame["treatment_step"] = frame["treatment_step"].astype("category")
    p = memsteer.profile(frame, bootstrap=200)
    pd.testing.assert_frame_equal(p.att, want, check_exact=True, check_dtype=False)
    polar = pl.read_csv(PANEL, infer_schema_length=None).with_columns(pl.col("instance_id").cast(pl.Categorical))
    p = memsteer.profile(polar, bootstrap=200)
    pd.testing.assert_frame_equal(p.att, want, check_exact=True, check_dtype=False)


def test_column_adapters_and_threads(cli_profile):
    frame = pd.read_csv(PANEL).rename(
        columns={"instance_id": "doc", "treatment_step": "g", "checkpoint_step": "step", "outcome": "y"}
    )
    one = memsteer.profile(frame, instance="doc", treatment="g", checkpoint="step", outcome="y", bootstrap=200, threads=1)
    two = memsteer.profile(frame, instance="doc", treatment="g", checkpoint="step", outcome="y", bootstrap=200, threads=2)
    pd.testing.assert_frame_equal(one.att, two.att, check_exact=True)
    pd.testing.assert_frame_equal(one.att, read_att(cli_profile / "att.csv"), check_exact=True, check_dtype=False)
    # Another seed moves the bands, not the estimates.
    other = memsteer.profile(frame, instance="doc", treatment="g", checkpoint="step", outcome="y", bootstrap=200, seed=5)
    assert (other.att["estimate"] == one.att["estimate"]).all()
    assert (other.att["band_upper"] != one.att["band_upper"]).any()


def test_settings_reach_the_estimator(tmp_path, cli):
    out = tmp_path / "cli"
    cli("profile", "--panel", str(PANEL), "--out", str(out), "--bootstrap", "0", "--estimator", "difference",
        "--control", "not-yet", "--no-figures", "--quiet")
    p = memsteer.profile(PANEL, bootstrap=0, estimator="difference", control="not-yet")
    pd.testing.assert_frame_equal(p.att, read_att(out / "att.csv"), check_exact=True, check_dtype=False)


def test_bad_input_raises_python_errors_with_the_cli_messages(tmp_path):
    with pytest.raises(FileNotFoundError):
        memsteer.profile(tmp_path / "nope.csv")
    with pytest.raises(memsteer.MissingFileError):
        memsteer.profile(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="estimator: expected one of did, difference"):
        memsteer.profile(PANEL, estimator="ols")
    frame = pd.read_csv(PANEL).rename(columns={"outcome": "loss"})
    with pytest.raises(memsteer.InputError, match="outcome"):
        memsteer.profile(frame)
    bad = pd.read_csv(PANEL)
    bad["checkpoint_step"] = bad["checkpoint_step"].astype(str)
    bad.loc[7, "checkpoint_step"] = "seven"
    with pytest.raises(memsteer.InputError, match="row 8"):
        memsteer.profile(bad)
    with pytest.raises(ValueError, match="alpha"):
        memsteer.profile(PANEL, alpha=0.9)
    with pytest.raises(memsteer.InputError, match="expected a path"):
        memsteer.profile(42)
    assert issubclass(memsteer.InputError, memsteer.MemsteerError)
    # Numbers Python holds but the settings cannot take.
    with pytest.raises(memsteer.InputError, match="bootstrap"):
        memsteer.profile(PANEL, bootstrap=-1)
    with pytest.raises(memsteer.InputError, match="seed"):
        memsteer.profile(PANEL, seed=2**70)
    with pytest.raises(memsteer.InputError, match="threads"):
        memsteer.profile(PANEL, threads=10**6)
    # A column pandas cannot export to Arrow (ints and strings mixed in objects).
    mixed = pd.read_csv(PANEL)
    mixed["outcome"] = mixed["outcome"].astype(object)
    mixed.loc[2, "outcome"] = "x"
    with pytest.raises(memsteer.InputError):
        memsteer.profile(mixed)
    # Null ids in a polars (string view) column are refused, naming the row.
    nulls = pl.read_csv(PANEL, infer_schema_length=None).with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col("instance_id")).alias("instance_id")
    )
    with pytest.raises(memsteer.InputError, match="row 5"):
        memsteer.profile(nulls)


def test_compare_equals_the_cli(tmp_path, cli):
    # The same panel under two estimators: shared cells, different estimates.
    a = memsteer.profile(PANEL, bootstrap=200)
    b = memsteer.profile(PANEL, bootstrap=200, estimator="difference")
    for name, p in [("a", a), ("b", b)]:
        p.save(tmp_path / name, figures=False)
    cli("compare", str(tmp_path / "a" / "att.csv"), str(tmp_path / "b" / "att.csv"), "--labels", "a,b",
        "--out", str(tmp_path / "cmp"))
    want = pd.read_csv(next((tmp_path / "cmp").glob("*.csv")), index_col=0, **EXACT)
    got = memsteer.compare([a, b], labels=["a", "b"])
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    assert got.attrs["n"].loc["a", "b"] > 10
    assert 0.0 < got.loc["a", "b"] < 1.0 and got.loc["a", "a"] == 1.0
    with pytest.raises(memsteer.InputError, match="at least two"):
        memsteer.compare([a])


def test_logprobs_equal_the_cli_panel(tiny_model, tmp_path, cli):
    m = memsteer.Model(tiny_model)
    texts = ["The cat sat on the mat.", "A very slow movie.", "Hello there, general."]
    ids = [m.encode(t) for t in texts]
    inst = tmp_path / "instances.jsonl"
    inst.write_text("".join(json.dumps({"id": f"x{i}", "treatment_step": None, "tokens": t}) + "\n" for i, t in enumerate(ids)))
    cli("logprobs", "--checkpoint", f"0={tiny_model}", "--instances", str(inst), "--out", str(tmp_path / "p.csv"),
        "--per-token", str(tmp_path / "tok.jsonl"), "--quiet")
    panel = pd.read_csv(tmp_path / "p.csv", **EXACT).set_index("instance_id")
    seq = m.sequence_logprobs(texts)
    assert seq.dtype == np.float64
    assert list(seq) == [panel.loc[f"x{i}", "outcome"] for i in range(3)]
    per_token = m.logprobs(ids)
    lines = [json.loads(l) for l in (tmp_path / "tok.jsonl").read_text().splitlines()]
    for i, lp in enumerate(per_token):
        want = next(l["token_log_probs"] for l in lines if l["id"] == f"x{i}")
        assert len(lp) == len(ids[i]) - 1
        np.testing.assert_array_equal(lp, np.array(want, dtype=np.float64))
    # Batch size and threads do not change the numbers.
    np.testing.assert_array_equal(m.sequence_logprobs(ids, batch_size=1, threads=1), seq)
    with pytest.raises(memsteer.InputError, match="sequence 1: token id 99999"):
        m.logprobs([[1, 2], [3, 99999]])
    with pytest.raises(memsteer.InputError, match="at least 2 tokens"):
        m.logprobs([[1]])
    with pytest.raises(FileNotFoundError):
        memsteer.Model(tmp_path / "absent")


def test_compute_modes_equal_the_cli(tiny_model, tmp_path, cli):
    texts = ["The cat sat on the mat.", "A very slow movie."]
    exact = memsteer.Model(tiny_model, compute="f32")
    assert exact.precision == "f32" and exact.compute.startswith("f32")
    np.testing.assert_array_equal(exact.sequence_logprobs(texts), memsteer.Model(tiny_model).sequence_logprobs(texts))
    bf16 = memsteer.Model(tiny_model, compute="bf16")
    assert bf16.precision == "bf16" and bf16.compute.startswith("bf16 on ")
    assert "bf16 products" in repr(bf16)
    ids = [bf16.encode(t) for t in texts]
    inst = tmp_path / "instances.jsonl"
    inst.write_text("".join(json.dumps({"id": f"x{i}", "treatment_step": None, "tokens": t}) + "\n" for i, t in enumerate(ids)))
    cli("--compute", "bf16", "logprobs", "--checkpoint", f"0={tiny_model}", "--instances", str(inst),
        "--out", str(tmp_path / "p.csv"), "--quiet")
    panel = pd.read_csv(tmp_path / "p.csv", **EXACT).set_index("instance_id")
    got, want = bf16.sequence_logprobs(ids), exact.sequence_logprobs(ids)
    # The same kernels as the command line, bit for bit; within the stated bound of f32, and not equal to it.
    assert list(got) == [panel.loc[f"x{i}", "outcome"] for i in range(2)]
    assert np.all(np.abs(got - want) <= 0.1 * np.maximum(1.0, np.abs(want))) and np.any(got != want)
    with pytest.raises(memsteer.InputError, match="unknown compute mode"):
        memsteer.Model(tiny_model, compute="fp8")


def test_generate_equals_steer_generate(tiny_model, tmp_path, cli):
    steer_path = tmp_path / "s.safetensors"
    cli("steer", "train", "--model", str(tiny_model), "--positive", str(FIXTURES / "guide" / "positive.jsonl"),
        "--negative", str(FIXTURES / "guide" / "negative.jsonl"), "--steps", "10", "--out", str(steer_path), "--quiet")
    m = memsteer.Model(tiny_model)
    steer = memsteer.Steer.load(steer_path)
    assert steer.fits(m) and steer.labels
    prompts = ["The food was", "I think"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(prompts)))
    for strength in (-3.0, 3.0):
        out = tmp_path / f"gen{strength}.jsonl"
        cli("steer", "generate", "--model", str(tiny_model), "--steer", f"{steer_path}:{strength}", "--prompts",
            str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "8", "--samples", "2", "--seed", "4", "--out", str(out))
        want = [json.loads(l) for l in out.read_text().splitlines()]
        got = m.generate(prompts, steers=[(steer, strength)], max_new_tokens=8, samples=2, seed=4)
        assert [(g["prompt_id"], g["sample"], g["tokens"], g["text"]) for g in got] == [
            (w["prompt_id"], w["sample"], w["tokens"], w["text"]) for w in want
        ]
    greedy = m.generate(prompts, max_new_tokens=5, temperature=0.0)
    assert greedy == m.generate(prompts, max_new_tokens=5, temperature=0.0, threads=1)
    with pytest.raises(memsteer.InputError, match="top_p"):
        m.generate(prompts, top_p=1.5)
    # A steer trained for another model is refused, naming it.
    other = memsteer.Model(FIXTURES / "lm" / "tiny-gpt2-f32")
    with pytest.raises(memsteer.InputError, match="transfer"):
        other.generate([[1, 2]], steers=[(steer, 1.0)])
    steer.save(tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == steer_path.read_bytes()


def test_theorem2_equals_the_cli(cli):
    want = json.loads(cli("hmm", "theorem2", "--seed", "3", "--states", "3", "--vocab", "4", "--length", "4", "--json"))
    assert memsteer.hmm.theorem2(seed=3, states=3, vocab=4, length=4) == want
    with pytest.raises(ValueError, match="condition"):
        memsteer.hmm.theorem2(conditions=1)


def test_long_calls_release_the_interpreter():
    # While a profile with many bootstrap draws runs in one thread, another keeps running Python.
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    t = threading.Thread(target=tick)
    t.start()
    before = len(ticks)
    memsteer.profile(PANEL, bootstrap=20000)
    during = len(ticks) - before
    done.set()
    t.join()
    assert during > 5, during


def _texts(path):
    return [json.loads(l)["text"] for l in path.read_text().splitlines()]


def test_steer_train_explain_highlight_transfer_equal_the_cli(tiny_model, tmp_path, cli):
    pos, neg = FIXTURES / "guide" / "positive.jsonl", FIXTURES / "guide" / "negative.jsonl"
    cli_steer = tmp_path / "cli.safetensors"
    cli("steer", "train", "--model", str(tiny_model), "--positive", str(pos), "--negative", str(neg),
        "--steps", "12", "--rank", "4", "--seed", "3", "--out", str(cli_steer), "--quiet")
    m = memsteer.Model(tiny_model)
    steer = memsteer.Steer.train(m, _texts(pos), _texts(neg), steps=12, rank=4, seed=3, threads=1)
    assert len(steer.losses) == 12 and all(np.isfinite(steer.losses))
    steer.save(tmp_path / "py.safetensors")
    assert (tmp_path / "py.safetensors").read_bytes() == cli_steer.read_bytes()

    want = json.loads(cli("steer", "explain", "--model", str(tiny_model), "--steer", str(cli_steer), "--dims", "2",
                          "--top", "3", "--json"))
    assert steer.explain(m, dims=2, top=3) == want

    text = "The food was great and the staff were lovely."
    want = json.loads(cli("steer", "highlight", "--model", str(tiny_model), "--steer", str(cli_steer), "--text", text,
                          "--spans", "2", "--span-length", "3", "--json"))
    got = steer.highlight(m, text, spans=2, span_length=3)
    want.pop("steer")
    assert got == want

    target_dir = tmp_path / "target"
    import shutil

    shutil.copytree(tiny_model, target_dir)
    cli("steer", "transfer", "--steer", str(cli_steer), "--from", str(tiny_model), "--to", str(target_dir),
        "--map", "authors", "--out", str(tmp_path / "moved-cli.safetensors"))
    moved = steer.transfer(m, memsteer.Model(target_dir), map="authors")
    moved.save(tmp_path / "moved-py.safetensors")
    assert (tmp_path / "moved-py.safetensors").read_bytes() == (tmp_path / "moved-cli.safetensors").read_bytes()
    assert moved.residual >= 0.0
    with pytest.raises(memsteer.InputError, match="map: expected one of"):
        steer.transfer(m, m, map="magic")
    with pytest.raises(memsteer.InputError, match="steps"):
        memsteer.Steer.train(m, _texts(pos), _texts(neg), steps=0)


def _big_panel(copies):
    frame = pd.read_csv(PANEL)
    parts = []
    for k in range(copies):
        part = frame.copy()
        part["instance_id"] = part["instance_id"].astype(str) + f"-{k}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def test_ctrl_c_stops_a_long_call_within_a_second():
    import _thread
    import time

    # 30,900 instances and 20,000 draws: the bootstrap alone takes many seconds, in small tasks.
    panel = _big_panel(100)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        memsteer.profile(panel, bootstrap=20_000)
    assert time.perf_counter() - start < 0.5 + 1.0
    timer.join()
    # The next call runs normally.
    assert memsteer.profile(PANEL, bootstrap=50).summary["n_instances"] == 309


def test_ctrl_c_during_a_call_without_check_points_is_not_lost(tmp_path):
    import _thread

    # Reading a large panel has no check point: the interrupt still comes out when it ends.
    panel = _big_panel(100)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        memsteer.profile(panel, bootstrap=0)
        time.sleep(2)  # only reached if the interrupt was swallowed: the sleep then takes it
        pytest.fail("the interrupt arrived after the call")
    timer.join()


def test_progress_is_drawn_on_python_stderr(capsys):
    memsteer.profile(_big_panel(10), bootstrap=20_000, progress=True)
    err = capsys.readouterr().err
    assert "bootstrap [" in err and err.endswith("\n"), err[-200:]
    memsteer.profile(PANEL, bootstrap=50)
    assert capsys.readouterr().err == ""


def test_simulate_writes_the_cli_files(tmp_path, cli):
    cli("hmm", "simulate", "--seed", "2", "--steps", "40", "--validation", "60", "--replicates", "2",
        "--out", str(tmp_path / "cli"))
    got = memsteer.hmm.simulate(tmp_path / "py", seed=2, steps=40, validation=60, replicates=2)
    for name in ["panel.csv", "truth.csv", "simulation.json"]:
        assert (tmp_path / "py" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    assert len(got["truth"]) > 0 and set(got["panel"].columns) >= {"instance_id", "outcome"}
    with pytest.raises(ValueError, match="counterfactual: expected one of substitute, remove"):
        memsteer.hmm.simulate(tmp_path / "x", counterfactual="swap")
