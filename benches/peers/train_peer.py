#!/usr/bin/env python3
"""PyTorch peer of crates/memsteer-lm/examples/train_bench.rs: the same GPT-NeoX (hidden 128, 4 layers,
4 heads, MLP 512, vocabulary 2048, rotary_pct 0.25, parallel residual, untied), the same batch shape,
AdamW + clipping at 1.0, one untimed warm-up step, then STEPS timed steps, in tokens per second.

Usage: train_peer.py THREADS STEPS [BATCH SEQ]   (torch 2.x + transformers, CPU, float32)
"""
import json
import sys
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    seq = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, rotary_pct=0.25, max_position_embeddings=max(seq, 128),
                        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
                        attention_dropout=0.0, hidden_dropout=0.0)
    model = GPTNeoXForCausalLM(cfg).float()
    model.config._attn_implementation = "eager"
    model.train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    batches = [torch.randint(0, 2048, (batch, seq)) for _ in range(steps + 1)]

    def step(ids):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step(batches[0])
    start, cpu0 = time.perf_counter(), time.process_time()
    for b in batches[1:]:
        loss = step(b)
    secs = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    print(json.dumps({"impl": f"torch {torch.__version__} eager", "threads": threads, "steps": steps, "batch": batch,
                      "seq": seq, "tokens_per_s": round(steps * batch * seq / secs, 1),
                      "s_per_step": round(secs / steps, 4), "cpu_s_per_step": round(cpu / steps, 4),
                      "last_loss": round(loss, 4)}))


if __name__ == "__main__":
    main()
