"""PyTorch reference numbers for scripts/gpu-check.sh, measured on the same GPU as memsteer's.

1. Sequence log-probs the way the memorisation paper's scripts compute them (HF GPTNeoXForCausalLM in
   fp16, logits -> log_softmax -> gather), random weights, B = 8, T = 2048, at the Pythia shapes:
   tokens/s (best of 3 after a warm-up) and peak allocated memory.
2. The output layer alone at n = 16384, V = 50304, d = 768 in bf16: matmul + log_softmax + gather.
3. (`families`) The same scoring at Qwen2.5-0.5B's and Llama-3.2-1B's shapes in bf16 (Qwen2ForCausalLM,
   LlamaForCausalLM, tied output layers, SDPA attention), B = 8, T = 2048.
One Markdown table row per measurement.
"""
import sys, time
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")


def best_of(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def score_row(name, model, V, B, T):
    """One table row: tokens/s of scoring B random sequences of T tokens (logits -> log_softmax -> gather),
    and peak allocated memory."""
    ids = torch.randint(0, V, (B, T), device=dev)

    def score():
        with torch.inference_mode():
            logits = model(ids).logits.float()
            return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).sum((1, 2))

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = best_of(score)
    print(f"| {name} | {B} | {T} | {B * T / t:.0f} | {torch.cuda.max_memory_allocated() / 2**30:.2f} |")


which = sys.argv[1:] or ["logprobs", "head", "families"]
if "logprobs" in which:
    print("| PyTorch fp16 (logits+log_softmax+gather) | B | T | tokens/s | peak GiB |\n|---|---|---|---|---|")
    shapes = {"pythia-70m": (512, 6, 8), "pythia-160m": (768, 12, 12), "pythia-410m": (1024, 24, 16), "pythia-1.4b": (2048, 24, 16)}
    V, T, B = 50304, 2048, 8
    for name, (d, layers, heads) in shapes.items():
        cfg = GPTNeoXConfig(vocab_size=V, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * d, rotary_pct=0.25, max_position_embeddings=T)
        with torch.device(dev):
            model = GPTNeoXForCausalLM(cfg).half().eval()
        score_row(name, model, V, B, T)
        del model
        torch.cuda.empty_cache()

if "head" in which:
    n, V, d = 16384, 50304, 768
    h = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
    E = torch.randn(V, d, device=dev, dtype=torch.bfloat16) * 0.02
    tgt = torch.randint(0, V, (n,), device=dev)

    def head():
        return torch.log_softmax((h @ E.T).float(), -1).gather(-1, tgt[:, None])

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = best_of(head, 5)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    tm = best_of(lambda: h @ E.T, 5)
    print(f"\n| PyTorch output layer n={n} V={V} d={d} bf16 | ms | peak MiB above inputs |\n|---|---|---|")
    print(f"| matmul + log_softmax + gather | {t * 1e3:.3f} | {peak:.0f} |")
    print(f"| matmul alone | {tm * 1e3:.3f} | |")

if "families" in which:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    print("\n| PyTorch bf16 (logits+log_softmax+gather) | B | T | tokens/s | peak GiB |\n|---|---|---|---|---|")
    T, B = 2048, 8
    shapes = {
        "qwen2.5-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)),
        "llama-3.2-1b": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                          rope_theta=500000.0)),
    }
    for name, (config, model_type, sizes) in shapes.items():
        cfg = config(max_position_embeddings=T, tie_word_embeddings=True, **sizes)
        with torch.device(dev):
            model = model_type(cfg).to(torch.bfloat16).eval()
        score_row(name, model, sizes["vocab_size"], B, T)
        del model
        torch.cuda.empty_cache()
