"""memsteer from Python: causal memorisation profiles over training checkpoints, and LM-Steer steering.

Every function calls the same Rust code as the ``memsteer`` command line, with its defaults, so results
equal the CLI's for the same inputs and seeds, whatever ``threads``. Long calls release the GIL, draw a
progress bar on ``sys.stderr`` with ``progress=True`` and stop on Ctrl-C (``KeyboardInterrupt``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native, hmm
from ._errors import InputError, MemsteerError, MissingFileError

__version__ = _native.__version__
__all__ = [
    "InputError",
    "MemsteerError",
    "MissingFileError",
    "Model",
    "Profile",
    "Steer",
    "compare",
    "hmm",
    "profile",
]

PathLike = Union[str, "os.PathLike[str]"]


def _checked(fn, *args, **kwargs):
    """Calls the native ``fn``, turning a Python value it cannot take (a negative or huge int, a float
    where an int is expected) into an ``InputError`` naming the argument."""
    try:
        return fn(*args, **kwargs)
    except (OverflowError, TypeError) as e:
        for name, v in kwargs.items():
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v < 2**64:
                raise InputError(f"{name}: expected a non-negative integer below 2**64, found {v}") from e
            if isinstance(v, float) and name in _INT_SETTINGS:
                raise InputError(f"{name}: expected an integer, found {v!r}") from e
        raise InputError(str(e)) from e


_INT_SETTINGS = {"bootstrap", "seed", "max_step", "min_cohort_size", "pretrend_window", "max_wald_cells", "threads",
                 "treatment_from_seq_idx"}


def _plain_columns(panel: Any) -> Any:
    """pandas and polars categorical columns as their values (Arrow would send dictionaries)."""
    module = type(panel).__module__.split(".")[0]
    if module == "pandas":
        import pandas as pd

        cats = [c for c in panel.columns if isinstance(panel[c].dtype, pd.CategoricalDtype)]
        if cats:
            panel = panel.copy()
            for c in cats:
                panel[c] = panel[c].astype(panel[c].cat.categories.dtype)
    elif module == "polars":
        import polars as pl

        cats = [c for c, t in panel.schema.items() if t == pl.Categorical or t == pl.Enum or isinstance(t, pl.Enum)]
        if cats:
            panel = panel.with_columns([pl.col(c).cast(pl.Utf8) for c in cats])
    return panel


def _arrow_stream(panel: Any) -> Tuple[Any, str]:
    """The Arrow C stream capsule of a table-like object, and a name for it in error messages."""
    panel = _plain_columns(panel)
    if hasattr(panel, "__arrow_c_stream__"):
        try:
            return panel.__arrow_c_stream__(), type(panel).__name__
        except Exception as e:  # the library's own conversion to Arrow (e.g. mixed types in a column)
            raise InputError(f"panel: {type(panel).__name__} could not be exported as an Arrow table: {e}") from e
    module = type(panel).__module__.split(".")[0]
    if module == "pandas":
        # pandas before 2.2 has no Arrow stream of its own: pyarrow converts it.
        try:
            import pyarrow as pa
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError(
                "panel: this pandas version has no __arrow_c_stream__; install pyarrow or pandas >= 2.2"
            ) from e
        try:
            table = pa.Table.from_pandas(panel, preserve_index=False)
        except Exception as e:
            raise InputError(f"panel: DataFrame could not be converted to an Arrow table: {e}") from e
        return table.__arrow_c_stream__(), "DataFrame"
    raise InputError(
        f"panel: expected a path (CSV or Parquet), a pandas or polars DataFrame, a pyarrow Table or any "
        f"object with __arrow_c_stream__, found {type(panel).__name__}"
    )


class Profile:
    """A memorisation profile: ``att`` and ``path`` as DataFrames, ``summary`` and ``diagnostics`` as
    dicts, ``save(dir)`` for the CLI's files and figures."""

    def __init__(self, native: Any):
        self._native = native
        self._att = None
        self._path = None

    @property
    def att(self):
        """The profile's cells, with the columns of ``att.csv``."""
        if self._att is None:
            import pandas as pd

            self._att = pd.DataFrame(self._native.att_columns())
        return self._att

    @property
    def path(self):
        """The path by event time, with the columns of ``path.csv``."""
        if self._path is None:
            import pandas as pd

            self._path = pd.DataFrame(self._native.path_columns())
        return self._path

    @property
    def summary(self) -> dict:
        """What ``summary.json`` holds."""
        return json.loads(self._native.summary_json())

    @property
    def diagnostics(self) -> dict:
        """What ``diagnostics.json`` holds."""
        return json.loads(self._native.diagnostics_json())

    @property
    def timings(self) -> dict:
        """Seconds spent handing the panel over (reading it) and estimating."""
        return {"handover": self._native.handover_seconds, "estimate": self._native.estimate_seconds}

    def save(self, dir: PathLike, figures: bool = True, mark_step: Optional[int] = None) -> List[str]:
        """Writes ``att.csv``, ``path.csv``, ``summary.json``, ``diagnostics.json`` and (unless
        ``figures=False``) the figures into ``dir``, each atomically; returns their paths."""
        return self._native.save(os.fspath(dir), figures, mark_step)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"<memsteer.Profile: {s['n_instances']} instances ({s['n_never_trained']} never trained), "
            f"{s['n_cohorts']} cohorts, {s['n_checkpoints']} checkpoints, "
            f"{s['n_significant_post_cells']} significant post-treatment cells>"
        )


def profile(
    panel: Any,
    *,
    instance: str = "instance_id",
    treatment: Optional[str] = None,
    checkpoint: str = "checkpoint_step",
    outcome: str = "outcome",
    treatment_from_seq_idx: Optional[int] = None,
    negate: bool = False,
    max_step: Optional[int] = None,
    drop_incomplete: bool = False,
    estimator: str = "did",
    control: str = "never",
    base_period: str = "varying",
    bootstrap: int = 1000,
    multiplier: str = "rademacher",
    band: str = "all",
    band_method: str = "student",
    alpha: float = 0.05,
    seed: int = 20240101,
    min_cohort_size: int = 10,
    pretrend_window: int = 10,
    max_wald_cells: int = 1500,
    threads: Optional[int] = None,
    progress: bool = False,
) -> Profile:
    """The memorisation profile of a panel, as ``memsteer profile`` estimates it.

    ``panel`` is a path to a CSV or Parquet file, a pandas or polars DataFrame, a pyarrow Table, or any
    object with ``__arrow_c_stream__`` (read through the Arrow C stream, without a CSV round trip). The
    column names and every setting are the CLI's flags (``treatment`` defaults to ``treatment_step``).
    ``progress=True`` draws a progress bar on ``sys.stderr``; Ctrl-C stops the call (KeyboardInterrupt).
    """
    if isinstance(panel, (str, os.PathLike)):
        source, name = os.fspath(panel), os.fspath(panel)
    else:
        source, name = _arrow_stream(panel)
    native = _checked(
        _native.profile,
        source,
        name,
        instance=instance,
        treatment=treatment,
        checkpoint=checkpoint,
        outcome=outcome,
        treatment_from_seq_idx=treatment_from_seq_idx,
        negate=negate,
        max_step=max_step,
        drop_incomplete=drop_incomplete,
        estimator=estimator,
        control=control,
        base_period=base_period,
        bootstrap=bootstrap,
        multiplier=multiplier,
        band=band,
        band_method=band_method,
        alpha=alpha,
        seed=seed,
        min_cohort_size=min_cohort_size,
        pretrend_window=pretrend_window,
        max_wald_cells=max_wald_cells,
        threads=threads,
        progress=progress,
    )
    return Profile(native)


def compare(profiles: Sequence[Profile], labels: Optional[Sequence[str]] = None, significant_only: bool = False):
    """Pearson's r between every pair of profiles over their shared post-treatment cells (as
    ``memsteer compare``), as a DataFrame indexed and labelled by ``labels``; ``.attrs["n"]`` holds the
    number of cells behind each r."""
    import pandas as pd

    profiles = list(profiles)
    if len(profiles) < 2:
        raise InputError(f"compare: expected at least two profiles, found {len(profiles)}")
    if labels is None:
        labels = [f"profile {i}" for i in range(len(profiles))]
    labels = list(labels)
    if len(labels) != len(profiles):
        raise InputError(f"compare: {len(labels)} labels for {len(profiles)} profiles")
    pairs = _native.compare([p._native for p in profiles], significant_only)
    k = len(profiles)
    r = np.array([p[0] for p in pairs], dtype=np.float64).reshape(k, k)
    n = np.array([p[1] for p in pairs], dtype=np.int64).reshape(k, k)
    out = pd.DataFrame(r, index=labels, columns=labels)
    out.attrs["n"] = pd.DataFrame(n, index=labels, columns=labels)
    return out


TokensOrText = Union[str, Sequence[int]]


class Model:
    """A Hugging Face model directory (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen, OLMo 2, Gemma 2 and 3)
    loaded onto ``device`` (``"cpu"``, or ``"cuda"``/``"cuda:N"`` in a build with CUDA).

    ``compute`` chooses the CPU's products as ``memsteer --compute`` does: ``"f32"`` (exact, the
    goldens' mode), ``"bf16"`` (bf16 products with f32 accumulation, within the bound
    ``docs/formats.md`` states), or ``"auto"`` (bf16 for bf16 checkpoints on CPUs with AMX, f32
    otherwise). A GPU multiplies in the weights' type and takes only ``"auto"``."""

    def __init__(self, dir: PathLike, device: str = "cpu", compute: str = "auto"):
        self._native = _checked(_native.Model, os.fspath(dir), device, compute)

    vocab_size = property(lambda self: self._native.vocab_size, doc="The model's vocabulary size.")
    context = property(lambda self: self._native.context, doc="The model's context length.")
    hidden_size = property(lambda self: self._native.hidden_size, doc="The hidden size.")
    device = property(lambda self: self._native.device, doc="Where the model runs.")
    compute = property(
        lambda self: self._native.compute, doc="What its products run in (``f32``, ``bf16 on amx kernels``, …)."
    )
    precision = property(
        lambda self: self._native.precision,
        doc="The precision class of its products: ``f32``, ``bf16``, or on a GPU ``cuda-`` and the weights' type.",
    )

    def _ids(self, seqs: Iterable[TokensOrText]) -> List[List[int]]:
        seqs = list(seqs)
        texts = [i for i, s in enumerate(seqs) if isinstance(s, str)]
        out = [s if isinstance(s, str) else [int(t) for t in s] for s in seqs]
        if texts:
            encoded = self._native.encode([seqs[i] for i in texts])
            for i, ids in zip(texts, encoded):
                out[i] = ids
        return out

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` under the model's tokenizer."""
        return self._native.encode([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self._native.decode([int(t) for t in ids])

    def logprobs(
        self, seqs: Iterable[TokensOrText], batch_size: int = 8, threads: Optional[int] = None, progress: bool = False
    ):
        """``log p(x_t | x_<t)`` for ``t ≥ 1`` of each sequence (token ids, or text tokenized with the
        model's tokenizer), as a list of float64 numpy arrays."""
        raw = _checked(self._native.logprobs, self._ids(seqs), batch_size, threads, progress)
        return [np.frombuffer(b, dtype="<f8") for b in raw]

    def sequence_logprobs(
        self, seqs: Iterable[TokensOrText], batch_size: int = 8, threads: Optional[int] = None, progress: bool = False
    ):
        """Each sequence's log-probability (first token not scored), as ``memsteer logprobs`` writes a
        panel's outcome: one float64 numpy array."""
        raw = _checked(self._native.sequence_logprobs, self._ids(seqs), batch_size, threads, progress)
        return np.frombuffer(raw, dtype="<f8")

    def generate(
        self,
        prompts: Iterable[TokensOrText],
        steers: Sequence[Tuple["Steer", float]] = (),
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        samples: int = 1,
        seed: int = 0,
        threads: Optional[int] = None,
    ) -> List[dict]:
        """Continuations of every prompt with ``steers`` (``(steer, strength)`` pairs, added up; each
        file's dummy steer at 1), as ``memsteer steer generate`` makes them: dicts with ``prompt_id``
        (the prompt's index), ``sample``, ``tokens`` and ``text`` (when the model has a tokenizer)."""
        rows = _checked(
            self._native.generate,
            self._ids(prompts),
            [(s._native, float(x)) for s, x in steers],
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            samples,
            seed,
            threads,
        )
        out = []
        for prompt, sample, tokens, text in rows:
            row = {"prompt_id": prompt, "sample": sample, "tokens": tokens}
            if text is not None:
                row["text"] = text
            out.append(row)
        return out

    def __repr__(self) -> str:
        return (
            f"<memsteer.Model {self._native.path!r} on {self.device} ({self.precision} products): "
            f"vocabulary {self.vocab_size}>"
        )


class Steer:
    """An LM-Steer steer file: ``Steer.load(path)``, ``save(path)``."""

    def __init__(self, native: Any):
        self._native = native

    @classmethod
    def load(cls, path: PathLike) -> "Steer":
        """Loads a steer file (as ``memsteer steer train`` writes it)."""
        return cls(_native.Steer.load(os.fspath(path)))

    def save(self, path: PathLike) -> None:
        """Writes the steer file atomically."""
        self._native.save(os.fspath(path))

    labels = property(lambda self: self._native.labels, doc="The labelled steers' names.")
    rank = property(lambda self: self._native.rank, doc="Rank of each steer.")
    hidden_size = property(lambda self: self._native.hidden_size, doc="Hidden size of its model.")
    vocab_size = property(lambda self: self._native.vocab_size, doc="Vocabulary size of its model.")
    epsilon = property(lambda self: self._native.epsilon, doc="ε, the scale of every strength.")

    def fits(self, model: Model) -> bool:
        """Whether the steer was made for ``model`` (its output embedding's fingerprint)."""
        return self._native.fits(model._native)

    @classmethod
    def train(
        cls,
        model: Model,
        positive: Iterable[TokensOrText],
        negative: Iterable[TokensOrText],
        rank: Optional[int] = None,
        steps: int = 1000,
        lr: float = 1e-2,
        batch_size: int = 32,
        epsilon: float = 1e-3,
        max_length: int = 256,
        weight_decay: float = 0.0,
        init_std: float = 1e-2,
        seed: int = 0,
        cache_memory: float = 4.0,
        cache_dir: Optional[PathLike] = None,
        threads: Optional[int] = None,
        progress: bool = False,
    ) -> "Steer":
        """Trains a steer on ``model`` (frozen) as ``memsteer steer train`` does: ``positive`` texts or
        token ids at strength +1, ``negative`` at −1. The loss of every step is in ``.losses``."""
        native, losses = _checked(
            _native.Steer.train,
            model._native,
            model._ids(positive),
            model._ids(negative),
            rank,
            steps,
            lr,
            batch_size,
            epsilon,
            max_length,
            weight_decay,
            init_std,
            seed,
            cache_memory,
            None if cache_dir is None else os.fspath(cache_dir),
            threads,
            progress,
        )
        steer = cls(native)
        steer.losses = losses
        return steer

    def explain(self, model: Model, dims: int = 5, top: int = 10) -> dict:
        """The tokens each of the ``dims`` strongest directions of W promotes and demotes (``top`` of
        each), as ``memsteer steer explain --json`` prints them."""
        return json.loads(_checked(self._native.explain, model._native, dims, top))

    def highlight(self, model: Model, text: str, strength: float = 1.0, spans: int = 4, span_length: int = 10) -> dict:
        """Per-token evidence ``log p(+strength) − log p(−strength)`` and the ``spans`` disjoint spans of
        at most ``span_length`` tokens with the largest total evidence (``memsteer steer highlight``)."""
        return json.loads(_checked(self._native.highlight, model._native, text, strength, spans, span_length))

    def transfer(
        self, source: Model, target: Model, map: str = "paper", top_k: Optional[int] = None, ridge: float = 0.0
    ) -> "Steer":
        """The steer moved from ``source`` (the model it was trained on) to ``target`` through a
        least-squares map between their output embeddings (``paper``: W' = HᵀWH, ``authors``: their
        script, ``two-sided``: HᵀWGᵀ), as ``memsteer steer transfer``; the fit's relative residual is in
        ``.residual``."""
        native, residual = _checked(self._native.transfer, source._native, target._native, map, top_k, ridge)
        moved = Steer(native)
        moved.residual = residual
        return moved

    def __repr__(self) -> str:
        return f"<memsteer.Steer {self.labels}: rank {self.rank}, hidden {self.hidden_size}>"
