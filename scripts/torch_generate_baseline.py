"""Generation baselines for `igpt bench generate`: the same Image GPT (REFERENCE.md section 3)
sampling side*side tokens per image with temperature 1, in two ways:

- "pytorch-kv": a PyTorch loop with its own key/value cache (one token per step);
- "hf-generate": Hugging Face ImageGPTForCausalImageModeling.generate() on a random model of
  the same size (skipped with a note if transformers is not installed).

Prints one JSON line per (implementation, batch): {"impl", "batch", "tokens_per_s", "seconds"}.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def make_weights(layers, d, vocab, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.02: torch.randn(*s, generator=g) * std
    w = {"wte": r(vocab, d), "wpe": r(ctx, d, std=0.01), "sos": r(d), "wtet": r(vocab, d), "ln_f": torch.ones(d)}
    for i in range(layers):
        w[f"{i}.ln_1"], w[f"{i}.ln_2"] = torch.ones(d), torch.ones(d)
        w[f"{i}.attn"] = r(d, 3 * d, std=d ** -0.5)
        w[f"{i}.proj"] = r(d, d, std=(d * layers) ** -0.5)
        w[f"{i}.fc"] = r(d, 4 * d)
        w[f"{i}.mproj"] = r(4 * d, d)
    return w


def norm(x, g):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g


@torch.no_grad()
def kv_loop(w, layers, d, heads, ctx, batch):
    hd = d // heads
    kc = torch.zeros(layers, batch, heads, ctx, hd)
    vc = torch.zeros(layers, batch, heads, ctx, hd)
    x_in = w["sos"].expand(batch, d)
    out = torch.zeros(batch, ctx, dtype=torch.long)
    for pos in range(ctx):
        x = (x_in + w["wpe"][pos]).unsqueeze(1)
        for i in range(layers):
            q, k, v = (norm(x, w[f"{i}.ln_1"]) @ w[f"{i}.attn"]).split(d, dim=-1)
            q, k, v = (z.view(batch, 1, heads, hd).transpose(1, 2) for z in (q, k, v))
            kc[i, :, :, pos] = k[:, :, 0]
            vc[i, :, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, kc[i, :, :, : pos + 1], vc[i, :, :, : pos + 1])
            x = x + y.transpose(1, 2).reshape(batch, 1, d) @ w[f"{i}.proj"]
            m = norm(x, w[f"{i}.ln_2"]) @ w[f"{i}.fc"]
            x = x + (m * torch.sigmoid(1.702 * m)) @ w[f"{i}.mproj"]
        logits = norm(x[:, 0], w["ln_f"]) @ w["wtet"].T
        tok = torch.multinomial(logits.softmax(-1), 1)[:, 0]
        out[:, pos] = tok
        x_in = w["wte"][tok]
    return out


def hf_generate(layers, d, heads, vocab, ctx, batch):
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    cfg = ImageGPTConfig(vocab_size=vocab + 1, n_positions=ctx, n_embd=d, n_layer=layers, n_head=heads)
    model = ImageGPTForCausalImageModeling(cfg).eval()
    start = torch.full((batch, 1), vocab, dtype=torch.long)
    with torch.no_grad():
        model.generate(input_ids=start, max_length=ctx + 1, do_sample=True, top_k=0, temperature=1.0,
                       pad_token_id=vocab)


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("layers", 8), ("embd", 256), ("heads", 8), ("vocab", 512), ("ctx", 1024), ("threads", 2)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = make_weights(a.layers, a.embd, a.vocab, a.ctx)
    for b in a.batches:
        t0 = time.perf_counter()
        kv_loop(w, a.layers, a.embd, a.heads, a.ctx, b)
        s = time.perf_counter() - t0
        print(json.dumps({"impl": "pytorch-kv", "batch": b, "tokens_per_s": b * a.ctx / s, "seconds": s}), flush=True)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(json.dumps({"note": "transformers is not installed; hf-generate skipped"}))
        return
    for b in a.batches:
        t0 = time.perf_counter()
        hf_generate(a.layers, a.embd, a.heads, a.vocab, a.ctx, b)
        s = time.perf_counter() - t0
        print(json.dumps({"impl": "hf-generate", "batch": b, "tokens_per_s": b * a.ctx / s, "seconds": s}), flush=True)


if __name__ == "__main__":
    main()
