"""PyTorch baseline for `igpt bench train`: the same Image GPT (REFERENCE.md section 3), trained
with scaled_dot_product_attention and AdamW on random tokens.

--device cpu (default): fp32, eager, timed with the host clock.
--device cuda: fp32 weights under bf16 autocast, AdamW(fused=True); --compile wraps the model in
  torch.compile. Timed with CUDA events over the steps after the warm-up (which also pays for
  the compilation), and the peak of torch.cuda.max_memory_allocated is reported.

Prints one JSON line: {"tokens_per_s": ..., "step_s": ..., "peak_rss_mb": ..., ...}; on cuda also
"peak_memory_bytes" (max_memory_allocated) and "device_in_use_bytes" (the driver's count of the
GPU's memory in use after the run, the CUDA context and the caching allocator's reserve included).
Usage: python3 scripts/torch_baseline.py --layers 8 --embd 256 --heads 8 --vocab 512 \
           --ctx 1024 --batch 8 --threads 2 --steps 5 --warmup 1 [--device cuda [--compile]]
"""
import argparse
import contextlib
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compile", action="store_true", help="train a torch.compile'd model")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    dev = torch.device(a.device)
    model = ImageGPT(a.layers, a.embd, a.heads, a.vocab, a.ctx).to(dev)
    # fused=True keeps the optimizer to a few kernels on the GPU, as igpt's own AdamW is one.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if a.compile else model
    tokens = torch.randint(0, a.vocab, (a.batch, a.ctx), device=dev)
    # bf16 autocast is PyTorch's usual mixed precision, the counterpart of igpt's bf16 products
    # with f32 weights, norms, loss and optimizer.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=False)
        with autocast():
            loss = fwd(tokens)
        loss.backward()
        opt.step()
        return loss

    for _ in range(a.warmup):
        step()
    if cuda:
        # Device work is asynchronous: events bracket the timed steps, and the peak counts only
        # them and the warm-up.
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.steps):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        step_s = start.elapsed_time(end) / 1000 / a.steps
    else:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        step_s = (time.perf_counter() - t0) / a.steps
    out = {"tokens_per_s": a.batch * a.ctx / step_s, "step_s": step_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "loss": loss.item(), "torch": torch.__version__, "device": a.device, "compile": a.compile,
           "autocast": "bf16" if cuda else None}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_memory_bytes=torch.cuda.max_memory_allocated(), device_in_use_bytes=total - free,
                   gpu=torch.cuda.get_device_name())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
