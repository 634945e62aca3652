"""Type stubs of memsteer's native core (the public API is in memsteer/__init__.py)."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

__version__: str

class Profile:
    handover_seconds: float
    estimate_seconds: float
    def att_columns(self) -> Dict[str, List[Any]]: ...
    def path_columns(self) -> Dict[str, List[Any]]: ...
    def summary_json(self) -> str: ...
    def diagnostics_json(self) -> str: ...
    def save(self, dir: str, figures: bool = True, mark_step: Optional[int] = None) -> List[str]: ...

def profile(
    panel: Any,
    source: str,
    *,
    instance: str,
    treatment: Optional[str],
    checkpoint: str,
    outcome: str,
    treatment_from_seq_idx: Optional[int],
    negate: bool,
    max_step: Optional[int],
    drop_incomplete: bool,
    estimator: str,
    control: str,
    base_period: str,
    bootstrap: int,
    multiplier: str,
    band: str,
    band_method: str,
    alpha: float,
    seed: int,
    min_cohort_size: int,
    pretrend_window: int,
    max_wald_cells: int,
    threads: Optional[int],
    progress: bool = False,
) -> Profile: ...
def compare(profiles: Sequence[Profile], significant_only: bool = False) -> List[Tuple[float, int]]: ...
def theorem2(seed: int, states: int, conditions: int, vocab: int, length: int, samples: int) -> str: ...
def simulate(
    out: str,
    seed: int,
    states: int,
    vocab: int,
    length: int,
    batch_size: int,
    steps: int,
    validation: int,
    lr: float,
    validation_shift: float,
    counterfactual: str,
    replicates: int,
) -> List[str]: ...

class Model:
    vocab_size: int
    context: int
    hidden_size: int
    device: str
    path: str
    has_tokenizer: bool
    compute: str
    precision: str
    def __init__(self, dir: str, device: str = "cpu", compute: str = "auto") -> None: ...
    def encode(self, texts: List[str]) -> List[List[int]]: ...
    def decode(self, ids: List[int]) -> str: ...
    def logprobs(
        self, seqs: List[List[int]], batch_size: int = 8, threads: Optional[int] = None, progress: bool = False
    ) -> List[bytes]: ...
    def sequence_logprobs(
        self, seqs: List[List[int]], batch_size: int = 8, threads: Optional[int] = None, progress: bool = False
    ) -> bytes: ...
    def generate(
        self,
        prompts: List[List[int]],
        steers: List[Tuple["Steer", float]],
        max_new_tokens: int,
        temperature: float,
        top_p: Optional[float],
        top_k: Optional[int],
        samples: int,
        seed: int,
        threads: Optional[int] = None,
    ) -> List[Tuple[int, int, List[int], Optional[str]]]: ...

class Steer:
    labels: List[str]
    num_steers: int
    rank: int
    hidden_size: int
    vocab_size: int
    epsilon: float
    @staticmethod
    def load(path: str) -> "Steer": ...
    def save(self, path: str) -> None: ...
    def fits(self, model: Model) -> bool: ...
    @staticmethod
    def train(
        model: Model,
        positive: List[List[int]],
        negative: List[List[int]],
        rank: Optional[int],
        steps: int,
        lr: float,
        batch_size: int,
        epsilon: float,
        max_length: int,
        weight_decay: float,
        init_std: float,
        seed: int,
        cache_memory: float,
        cache_dir: Optional[str],
        threads: Optional[int],
        progress: bool = False,
    ) -> Tuple["Steer", List[float]]: ...
    def explain(self, model: Model, dims: int, top: int) -> str: ...
    def highlight(self, model: Model, text: str, strength: float, spans: int, span_length: int) -> str: ...
    def transfer(
        self, source: Model, target: Model, map: str, top_k: Optional[int], ridge: float
    ) -> Tuple["Steer", float]: ...
