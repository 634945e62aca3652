#!/usr/bin/env python3
"""The LM-Steer authors' training loop, timed, for a side-by-side with `memsteer steer train`.

As in the authors' code (github.com/Glaciohound/LM-Steer), every step runs the frozen model on the batch
and applies the steer to the last hidden state before the output layer:
h' = h + eps * sum_s v_s (h P1_s) P2_s^T with the labelled steer at +1/-1 and the dummy steer at 1,
logits = h' E^T, loss = mean cross-entropy over the batch's predicted tokens, Adam on P1, P2 only.
Same settings as memsteer: rank R, eps, Adam lr, batch B of sequences truncated to L tokens, drawn
uniformly from both corpora. Corpora are JSON lines with a `tokens` array (the same files memsteer reads).

Usage:
  steer_peer.py make-model DIR                 # a random GPT-2 small (124M) in float32, safetensors
  steer_peer.py make-corpora DIR N L VOCAB     # DIR/pos.jsonl, DIR/neg.jsonl: N random sequences of L ids
  steer_peer.py train DIR POS NEG THREADS STEPS B L R   # prints seconds for the whole run
"""
import json
import random
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def make_model(out):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).float().save_pretrained(out, safe_serialization=True)


def make_corpora(out, n, length, vocab):
    rng = random.Random(5)
    for name in ("pos", "neg"):
        with open(f"{out}/{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"tokens": [rng.randrange(vocab) for _ in range(length)]}) + "\n")


def read(path, length):
    with open(path) as f:
        return [json.loads(line)["tokens"][:length] for line in f if line.strip()]


def train(model_dir, pos, neg, threads, steps, batch, length, rank, eps=1e-3, lr=1e-2):
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.config.n_embd
    data = [(s, 1.0) for s in read(pos, length)] + [(s, -1.0) for s in read(neg, length)]
    p1 = (torch.randn(2, d, rank) * 1e-2).requires_grad_()
    p2 = (torch.randn(2, d, rank) * 1e-2).requires_grad_()
    opt = torch.optim.Adam([p1, p2], lr=lr)
    emb = model.get_output_embeddings().weight
    rng = random.Random(2)
    for _ in range(steps):
        picked = [data[rng.randrange(len(data))] for _ in range(batch)]
        width = max(len(s) for s, _ in picked)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, (s, _) in enumerate(picked):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        values = torch.tensor([[v, 1.0] for _, v in picked])  # labelled steer, dummy steer
        h = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # the full forward
        shift = torch.einsum("btd,sdr->bstr", h, p1)
        shift = torch.einsum("bstr,ser->bste", shift, p2)
        h = h + eps * (values[:, :, None, None] * shift).sum(1)
        logits = h @ emb.T
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, float(loss)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make-model":
        make_model(sys.argv[2])
    elif cmd == "make-corpora":
        make_corpora(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        a = sys.argv[2:]
        secs, loss = train(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]), int(a[7]))
        print(json.dumps({"seconds": secs, "final_loss": loss}))
