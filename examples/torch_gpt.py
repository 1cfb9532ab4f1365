#!/usr/bin/env python3
"""Trains a small GPT written in PyTorch on the synthetic associative-recall task of train_gpt.cpp, once per
attention: torch's exact attention (softmax(QK^T / sqrt(d)) V with autograd), polyattn's exact method and polyattn's
adjoint (the exact gradient of the degree-g polynomial attention), all from the same seed on the same data. Prints
the loss and the time per step, and at the end each run's training and held-out loss, accuracy and step time.

    PYTHONPATH=build/release/python /usr/bin/python3 examples/torch_gpt.py [--steps 300] [--threads 1] ...

(--help lists the options.) The task: each sequence holds one (key, value) pair token per key, scattered among
noise tokens in the first part of the context; the last `queries` positions name a key and are scored on
answering its value, so a model that does not recall reaches at best loss ln(values).

polyattn's exact method must end at the same loss as torch's exact attention up to rounding: both compute the same
function and gradient, only in another order of floating-point operations.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import polyattn
import polyattn.torch


class RecallTask:
    """Associative recall as in examples/train_gpt.cpp. Ids: pair tokens key * values + value, then query tokens
    (one per key), noise tokens, answer tokens (one per value). Targets are -100 (ignored) except at queries."""

    noise = 16

    def __init__(self, context, keys, values, queries):
        if keys < 1 or values < 2 or queries < 1 or context < keys + queries:
            raise ValueError("the recall task needs --keys >= 1, --values >= 2, --queries >= 1 and "
                             "--context >= keys + queries")
        self.context, self.keys, self.values, self.queries = context, keys, values, queries
        self.vocab = keys * values + keys + self.noise + values

    def sample(self, batch, generator):
        query_base = self.keys * self.values
        noise_base = query_base + self.keys
        answer_base = noise_base + self.noise
        memory = self.context - self.queries
        tokens = noise_base + torch.randint(0, self.noise, (batch, self.context), generator=generator)
        targets = torch.full((batch, self.context), -100)
        for b in range(batch):
            positions = torch.randperm(memory, generator=generator)[:self.keys]
            value_of = torch.randint(0, self.values, (self.keys,), generator=generator)
            tokens[b, positions] = torch.arange(self.keys) * self.values + value_of
            asked = torch.randint(0, self.keys, (self.queries,), generator=generator)
            tokens[b, memory:] = query_base + asked
            targets[b, memory:] = answer_base + value_of[asked]
        return tokens, targets


def torch_exact_attention(q, k, v):
    """Causal softmax attention with torch autograd (torch 1.13 has no scaled_dot_product_attention)."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


class Block(torch.nn.Module):
    """Pre-LayerNorm GPT block, as polyattn's GPT: Z = X + Attn(LN(X)), Y = Z + MLP(LN(Z))."""

    def __init__(self, d_model, heads, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.ln1, self.ln2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        batch, n, d_model = x.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).chunk(3, -1))
        y = self.attention(q, k, v).transpose(1, 2).reshape(batch, n, d_model)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    def __init__(self, vocab, context, d_model, heads, layers, attention):
        super().__init__()
        self.token = torch.nn.Embedding(vocab, d_model)
        self.position = torch.nn.Embedding(context, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, heads, attention) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens):
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_and_accuracy(model, tokens, targets):
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    scored = targets >= 0
    accuracy = (logits.argmax(-1)[scored] == targets[scored]).double().mean().item()
    return loss, accuracy


def train(args, task, label, attention):
    torch.manual_seed(args.seed)  # the same initial parameters for every run
    dtype = getattr(torch, args.dtype)
    model = GPT(task.vocab, task.context, args.d_model, args.heads, args.layers, attention).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    data = torch.Generator().manual_seed(args.seed + 77)  # the same data stream for every run
    warmup = max(1, args.steps // 10)
    seconds, losses = 0.0, []
    for step in range(1, args.steps + 1):
        tokens, targets = task.sample(args.batch, data)
        # linear warm-up, then cosine decay to a tenth of the peak rate (as train_gpt.cpp)
        progress = 0 if step <= warmup else (step - warmup) / max(1, args.steps - warmup)
        rate = args.lr * (step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = loss_and_accuracy(model, tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            print(f"  [{label:<20}] step {step:4d}/{args.steps}  loss {losses[-1]:.4f}  "
                  f"{1e3 * seconds / step:7.1f} ms/step", flush=True)
    evaluation = torch.Generator().manual_seed(args.seed + 1000)
    with torch.no_grad():
        eval_loss, eval_accuracy = loss_and_accuracy(model, *task.sample(8, evaluation))
    return {"label": label, "loss": losses[-1], "eval_loss": eval_loss.item(), "eval_accuracy": eval_accuracy,
            "ms_per_step": 1e3 * seconds / args.steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--keys", type=int, default=4, help="recall keys")
    parser.add_argument("--values", type=int, default=4, help="recall values")
    parser.add_argument("--queries", type=int, default=None, help="scored query positions (default context / 4)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--degree", type=int, default=2, help="Taylor degree of the adjoint run")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and of polyattn")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.log_every < 1 or args.threads < 1:
        parser.error("--steps, --batch, --log-every and --threads must be >= 1")
    if args.d_model % args.heads:
        parser.error("--heads must divide --d-model")
    task = RecallTask(args.context, args.keys, args.values,
                      args.queries if args.queries is not None else args.context // 4)
    torch.set_num_threads(args.threads)
    polyattn.set_num_threads(args.threads)

    print(f"recall: context {task.context}, {task.keys} keys, {task.values} values, {task.queries} queries; GPT "
          f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads; {args.steps} steps of {args.batch} "
          f"sequences, {args.dtype}, {args.threads} thread(s); chance: loss {math.log(task.values):.3f}, accuracy "
          f"{100 / task.values:.0f}%")
    runs = [
        ("torch exact", torch_exact_attention),
        ("polyattn exact", lambda q, k, v: polyattn.torch.attention(q, k, v, method="exact_blocked", causal=True)),
        (f"polyattn adjoint g={args.degree}",
         lambda q, k, v: polyattn.torch.attention(q, k, v, method="adjoint", causal=True, degree=args.degree)),
    ]
    results = [train(args, task, label, attention) for label, attention in runs]

    print(f"\n{'run':<20} {'train loss':>10} {'eval loss':>10} {'eval acc':>9} {'ms/step':>8}")
    for r in results:
        print(f"{r['label']:<20} {r['loss']:10.6f} {r['eval_loss']:10.6f} {100 * r['eval_accuracy']:8.1f}% "
              f"{r['ms_per_step']:8.1f}")
    torch_run, exact_run = results[0], results[1]
    difference = abs(exact_run["loss"] - torch_run["loss"]) / torch_run["loss"]
    print(f"\npolyattn exact vs torch exact: final training loss differs by {difference:.1e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
