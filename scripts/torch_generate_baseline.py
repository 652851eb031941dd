"""Generation baselines for `igpt bench generate` and `igpt bench complete`: the same Image GPT
(REFERENCE.md section 3) sampling with temperature 1, in two ways:

- "pytorch-kv": a PyTorch loop with its own key/value cache (one token per step);
- "pytorch-kv-graph" (--device cuda only): the same step with static shapes (attention over
  the whole cache, later positions masked; the position a device tensor; sampling by an
  exponential race, argmax of p / E with E ~ Exp(1)), captured once as a CUDA graph and
  replayed at every position;
- "hf-generate": Hugging Face ImageGPTForCausalImageModeling.generate() on a random model of
  the same size (skipped with a note if transformers is not installed).

Only generation is timed: imports, model construction and the loop's cache allocation happen
before the clock starts, and each implementation runs a short warm-up first.

--device cuda runs both on the GPU in bfloat16 (weights, caches and activations; generation
reads every weight once per token, so half the bytes is the usual choice there), synchronising
before each clock reading.

--mode generate: `ctx` tokens per image from the start token, for each batch size.
--mode complete: `k` completions of one image whose first `keep` tokens are given (Hugging Face
  only: its generate() takes the kept tokens as a prompt, in one forward pass).

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
def kv_loop(w, layers, d, heads, ctx, batch, kc, vc, steps):
    """Samples `steps` tokens per image into preallocated caches `kc`, `vc`."""
    hd = d // heads
    x_in = w["sos"].expand(batch, d)
    out = torch.zeros(batch, steps, dtype=torch.long, device=kc.device)
    for pos in range(steps):
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
        # Sampled from f32 probabilities whatever the weights' type, as igpt samples.
        tok = torch.multinomial(logits.float().softmax(-1), 1)[:, 0]
        out[:, pos] = tok
        x_in = w["wte"][tok]
    return out


class StaticStep:
    """One decoding step with every shape fixed, so a CUDA graph can replay it: inputs `x_in`
    [batch, d] and the position `pos` (a one-element device tensor) in, the sampled tokens
    `tok` [batch] out, the next input written back to `x_in`."""

    def __init__(self, w, layers, d, heads, ctx, kc, vc):
        self.w, self.layers, self.d, self.heads, self.ctx = w, layers, d, heads, ctx
        self.kc, self.vc = kc, vc
        batch, dev = kc.shape[1], kc.device
        self.x_in = w["sos"].expand(batch, d).clone()
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits = None
        self.positions = torch.arange(ctx, device=dev)

    def reset(self):
        self.x_in.copy_(self.w["sos"].expand_as(self.x_in))

    @torch.no_grad()
    def __call__(self):
        w, d, heads = self.w, self.d, self.heads
        batch, hd = self.x_in.shape[0], d // heads
        visible = (self.positions <= self.pos).view(1, 1, 1, self.ctx)
        x = (self.x_in + w["wpe"].index_select(0, self.pos)).unsqueeze(1)
        for i in range(self.layers):
            q, k, v = (norm(x, w[f"{i}.ln_1"]) @ w[f"{i}.attn"]).split(d, dim=-1)
            q, k, v = (z.view(batch, 1, heads, hd).transpose(1, 2) for z in (q, k, v))
            self.kc[i].index_copy_(2, self.pos, k)
            self.vc[i].index_copy_(2, self.pos, v)
            y = F.scaled_dot_product_attention(q, self.kc[i], self.vc[i], attn_mask=visible)
            x = x + y.transpose(1, 2).reshape(batch, 1, d) @ w[f"{i}.proj"]
            m = norm(x, w[f"{i}.ln_2"]) @ w[f"{i}.fc"]
            x = x + (m * torch.sigmoid(1.702 * m)) @ w[f"{i}.mproj"]
        self.logits = norm(x[:, 0], w["ln_f"]) @ w["wtet"].T
        probs = self.logits.float().softmax(-1)
        # argmax of p / E, E ~ Exp(1), draws from p (and, unlike multinomial, records in a graph).
        self.tok.copy_((probs / torch.empty_like(probs).exponential_()).argmax(-1))
        self.x_in.copy_(w["wte"].index_select(0, self.tok))


def capture(step):
    """`step` captured as a CUDA graph, after a warm-up on a side stream as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def replay(step, graph, steps):
    """Samples positions 0..steps by replaying `graph`; returns the tokens [batch, steps]."""
    out = torch.zeros(step.tok.shape[0], steps, dtype=torch.long, device=step.tok.device)
    step.reset()
    for pos in range(steps):
        step.pos.fill_(pos)
        graph.replay()
        out[:, pos] = step.tok
    return out


def hf_model(layers, d, heads, vocab, ctx):
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    cfg = ImageGPTConfig(vocab_size=vocab + 1, n_positions=ctx, n_embd=d, n_layer=layers, n_head=heads)
    return ImageGPTForCausalImageModeling(cfg).eval()


@torch.no_grad()
def hf_generate(model, prompt, max_length, vocab):
    model.generate(input_ids=prompt, max_length=max_length, min_length=max_length, do_sample=True,
                   top_k=0, temperature=1.0, pad_token_id=vocab)


def emit(impl, batch, tokens, seconds):
    print(json.dumps({"impl": impl, "batch": batch, "tokens_per_s": tokens / seconds, "seconds": seconds}),
          flush=True)


def clock(device):
    """The host clock, after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("layers", 8), ("embd", 256), ("heads", 8), ("vocab", 512), ("ctx", 1024), ("threads", 2),
                          ("keep", 512), ("k", 4)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--mode", choices=["generate", "complete"], default="generate")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hd = a.embd // a.heads
    if a.mode == "generate":
        w = {k: v.to(dev, dtype) for k, v in make_weights(a.layers, a.embd, a.vocab, a.ctx).items()}
        for b in a.batches:
            kc = torch.zeros(a.layers, b, a.heads, a.ctx, hd, device=dev, dtype=dtype)
            vc = torch.zeros(a.layers, b, a.heads, a.ctx, hd, device=dev, dtype=dtype)
            kv_loop(w, a.layers, a.embd, a.heads, a.ctx, b, kc, vc, 16)
            t0 = clock(dev)
            kv_loop(w, a.layers, a.embd, a.heads, a.ctx, b, kc, vc, a.ctx)
            emit("pytorch-kv", b, b * a.ctx, clock(dev) - t0)
            if dev.type == "cuda":
                # Its failure is reported, and the other baselines still run.
                try:
                    step = StaticStep(w, a.layers, a.embd, a.heads, a.ctx, kc, vc)
                    graph = capture(step)
                    replay(step, graph, 16)
                    t0 = clock(dev)
                    replay(step, graph, a.ctx)
                    emit("pytorch-kv-graph", b, b * a.ctx, clock(dev) - t0)
                except Exception as e:
                    print(json.dumps({"note": f"pytorch-kv-graph at batch {b} failed: {e!r}"}), flush=True)
    try:
        model = hf_model(a.layers, a.embd, a.heads, a.vocab, a.ctx).to(dev, dtype)
    except ImportError:
        print(json.dumps({"note": "transformers is not installed; hf-generate skipped"}))
        return
    if a.mode == "generate":
        for b in a.batches:
            start = torch.full((b, 1), a.vocab, dtype=torch.long, device=dev)
            hf_generate(model, start, 17, a.vocab)
            t0 = clock(dev)
            hf_generate(model, start, a.ctx + 1, a.vocab)
            emit("hf-generate", b, b * a.ctx, clock(dev) - t0)
    else:
        g = torch.Generator().manual_seed(1)
        kept = torch.randint(0, a.vocab, (1, a.keep), generator=g).expand(a.k, a.keep)
        prompt = torch.cat([torch.full((a.k, 1), a.vocab, dtype=torch.long), kept], dim=1).to(dev)
        hf_generate(model, prompt, a.keep + 17, a.vocab)
        t0 = clock(dev)
        hf_generate(model, prompt, a.ctx + 1, a.vocab)
        emit("hf-generate", a.k, a.k * (a.ctx - a.keep), clock(dev) - t0)


if __name__ == "__main__":
    main()
