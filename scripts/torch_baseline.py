"""PyTorch baseline for `igpt bench train`: the same Image GPT (REFERENCE.md section 3), trained
eagerly with scaled_dot_product_attention and AdamW, fp32, on random tokens.

Prints one JSON line: {"tokens_per_s": ..., "step_s": ..., "peak_rss_mb": ...}.
Usage: python3 scripts/torch_baseline.py --layers 8 --embd 256 --heads 8 --vocab 512 \
           --ctx 1024 --batch 8 --threads 2 --steps 5 --warmup 1
"""
import argparse
import json
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = Norm(d), Norm(d)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        m = self.c_fc(self.ln_2(x))
        return x + self.mlp_proj(m * torch.sigmoid(1.702 * m))


class ImageGPT(nn.Module):
    def __init__(self, layers, d, h, vocab, ctx):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(ctx, d) * 0.01)
        self.sos = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.ln_f = Norm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        b, t = tokens.shape
        x = torch.cat([self.sos.expand(b, 1, -1), self.wte(tokens[:, :-1])], dim=1) + self.wpe[:t]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("layers", 8), ("embd", 256), ("heads", 8), ("vocab", 512), ("ctx", 1024),
                          ("batch", 8), ("threads", 2), ("steps", 5), ("warmup", 1)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ImageGPT(a.layers, a.embd, a.heads, a.vocab, a.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.ctx))
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = model(tokens)
        loss.backward()
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": a.batch * a.ctx / step_s, "step_s": step_s, "peak_rss_mb": peak,
                      "loss": loss.item(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
