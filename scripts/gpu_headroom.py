"""What more compute would buy on Fashion-MNIST: an independent PyTorch check, run on a GPU, of
the two levers the README names for the missed representation targets.

Starting from an igpt run (model.safetensors, the run's token caches) it
  1. checks the model loads right: held-out NLL against igpt's number;
  2. probes the concatenated layers with the same protocol as `igpt probe` (standardised features,
     L2 chosen on the validation split, L-BFGS, refit on train + validation), to calibrate;
  3. fine-tunes (L_GEN + L_CLF, mean-pooled final norm, probe-initialised head, Adam beta2 0.95,
     constant rate after a short ramp) for many epochs with reflection-pad crop and flips;
  4. continues pre-training for a time budget, then probes and fine-tunes that model.
Every phase has a wall-clock budget; results go to OUT/results.json as each finishes.

  python3 scripts/gpu_headroom.py --run runs/fashion-ar --test-tokens T1 T2 --out DIR
The test tokens are igpt token caches of the 10,000 test images made with the run's palette, e.g.
  igpt train --data t10k-images-idx3-ubyte.gz --side 14 --palette runs/fashion-ar/palette.json \
    --layers 1 --embd 16 --heads 1 --steps 1 --out /tmp/testtok   (then /tmp/testtok/data/*.tokens)
"""
import argparse
import json
import math
import os
import struct
import time

import torch
import torch.nn.functional as F


def load_safetensors(path):
    """float32 tensors of a safetensors file (read by hand: the GPU machine may lack the package)."""
    raw = open(path, "rb").read()
    hlen = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + hlen])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{path}: {name} is {info['dtype']}, expected F32"
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(raw[8 + hlen + a : 8 + hlen + b]), dtype=torch.float32).reshape(
            info["shape"])
    return out


def read_tokens(path):
    """An igpt token cache: magic, u64 header length, JSON header, u16 tokens, u32 labels."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"IGPTTOK1", f"{path}: not an igpt token cache"
    hlen = struct.unpack("<Q", raw[8:16])[0]
    header = json.loads(raw[16 : 16 + hlen])
    at = 16 + hlen
    at += (-at) % 8
    n, t = header["n"], header["t"]
    tokens = torch.frombuffer(bytearray(raw[at : at + n * t * 2]), dtype=torch.int16)  # tokens < 2^15
    at += n * t * 2
    at += (-at) % 4
    assert header["labelled"], f"{path}: no labels"
    labels = torch.frombuffer(bytearray(raw[at : at + n * 4]), dtype=torch.int32)
    return tokens.long().reshape(n, t), labels.long()


class Igpt(torch.nn.Module):
    """Image GPT with igpt's tensor names: RMS-style norm with a gain only, no biases, a start
    token, untied output head, GELU by the sigmoid approximation."""

    def __init__(self, params, n_head):
        super().__init__()
        self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v) for k, v in params.items()})
        self.n_layer = sum(1 for k in params if k.endswith(".ln_1.g"))
        self.n_head = n_head

    def w(self, name):
        return self.p[name.replace(".", "__")]

    @staticmethod
    def norm(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def forward(self, tokens, feature_layers=()):
        """Logits, the final norm's output and the mean-pooled normalised input of each listed layer."""
        b, t = tokens.shape
        d = self.w("wte").shape[1]
        x = torch.cat([self.w("sos").expand(b, 1, d), self.w("wte")[tokens[:, :-1]]], 1) + self.w("wpe")[:t]
        feats = {}
        for i in range(self.n_layer):
            a = self.norm(x, self.w(f"h.{i}.ln_1.g"))
            if i in feature_layers:
                feats[i] = a.mean(1)
            q, k, v = (a @ self.w(f"h.{i}.attn.c_attn.w")).split(d, -1)
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + y @ self.w(f"h.{i}.attn.c_proj.w")
            m = self.norm(x, self.w(f"h.{i}.ln_2.g")) @ self.w(f"h.{i}.mlp.c_fc.w")
            x = x + (m * torch.sigmoid(1.702 * m)) @ self.w(f"h.{i}.mlp.c_proj.w")
        lnf = self.norm(x, self.w("ln_f.g"))
        if self.n_layer in feature_layers:
            feats[self.n_layer] = lnf.mean(1)
        return lnf @ self.w("wtet").T, lnf, feats


def batches(n, size, shuffle, gen=None):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, size):
        yield order[i : i + size]


@torch.no_grad()
def nll(model, tokens, dev, bs=500):
    total = 0.0
    for idx in batches(len(tokens), bs, False):
        tk = tokens[idx].to(dev)
        logits, _, _ = model(tk)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tk.reshape(-1), reduction="sum").item()
    return total / tokens.numel()


@torch.no_grad()
def features(model, tokens, layers, dev, bs=500):
    out = {l: [] for l in layers}
    for idx in batches(len(tokens), bs, False):
        _, _, f = model(tokens[idx].to(dev), feature_layers=set(layers))
        for l in layers:
            out[l].append(f[l].double())
    return torch.cat([torch.cat(out[l]) for l in layers], 1)


def fit_logistic(x, y, classes, l2, start=None, max_iter=3000):
    """Mean cross-entropy + l2/2 |W|^2 (bias free) by L-BFGS; returns (W, b, iterations)."""
    w = (start[0].clone() if start else torch.zeros(x.shape[1], classes, dtype=x.dtype, device=x.device)).requires_grad_()
    b = (start[1].clone() if start else torch.zeros(classes, dtype=x.dtype, device=x.device)).requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), opt.state[opt._params[0]]["n_iter"]


def accuracy(x, y, w, b):
    return ((x @ w + b).argmax(1) == y).double().mean().item() * 100


def probe(ftr, ytr, fva, yva, fte, yte, classes=10):
    """igpt's protocol: standardise on the fit split, grid from strong to weak (going past a
    winning edge), refit on train + validation from the chosen fit, test accuracy."""
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    xtr, xva = (ftr - mu) / sd, (fva - mu) / sd
    fits, sweep = {}, []

    def score(l2):
        near = min(fits, key=lambda s: abs(math.log(s / l2)), default=None)
        fits[l2] = fit_logistic(xtr, ytr, classes, l2, fits[near][:2] if near else None)
        sweep.append((l2, accuracy(xva, yva, *fits[l2][:2])))
        return sweep[-1][1]

    for l2 in [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]:
        score(l2)
    for _ in range(3):
        best = max(sweep, key=lambda s: (s[1], s[0]))
        lo, hi = min(s[0] for s in sweep), max(s[0] for s in sweep)
        nxt = best[0] / 10 if best[0] == lo else best[0] * 10 if best[0] == hi else None
        if nxt is None or score(nxt) <= best[1]:
            break
    l2, val = max(sweep, key=lambda s: (s[1], s[0]))
    fall, yall = torch.cat([ftr, fva]), torch.cat([ytr, yva])
    mu, sd = fall.mean(0), fall.std(0).clamp_min(1e-6)
    w, b, iters = fit_logistic((fall - mu) / sd, yall, classes, l2, fits[l2][:2])
    return dict(l2=l2, val=val, test=accuracy((fte - mu) / sd, yte, w, b), iterations=iters,
                sweep=sorted(sweep))


def augment(tokens, side, gen, pad=1):
    """Random left-right flip and reflection-pad crop of token grids."""
    b = tokens.shape[0]
    g = tokens.view(b, side, side)
    flip = torch.rand(b, generator=gen, device=tokens.device) < 0.5
    g = torch.where(flip[:, None, None], g.flip(-1), g)
    padded = F.pad(g[:, None].float(), (pad, pad, pad, pad), mode="reflect")[:, 0].long()
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=tokens.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=tokens.device)
    ar = torch.arange(side, device=tokens.device)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    return padded[torch.arange(b, device=tokens.device)[:, None, None], rows, cols].reshape(b, -1)


def finetune(params, n_head, data, dev, lr, batch, budget, aug=True, side=14, warmup=75, seed=0):
    """L_GEN + L_CLF with a probe-initialised head on the mean-pooled final norm; validation
    every epoch, test accuracy of the best-validation state."""
    (xtr, ytr), (xva, yva), (xte, yte) = data
    model = Igpt({k: v.clone() for k, v in params.items()}, n_head).to(dev)
    L = model.n_layer
    ftr = features(model, xtr, [L], dev).float()
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    sub = torch.randperm(len(ftr), generator=torch.Generator().manual_seed(seed))[:10000].to(dev)
    w0, b0, _ = fit_logistic(((ftr - mu) / sd)[sub].double(), ytr.to(dev)[sub], 10, 1e-4, max_iter=500)
    head_w = torch.nn.Parameter(w0.float())
    head_b = torch.nn.Parameter(b0.float())
    opt = torch.optim.Adam(list(model.parameters()) + [head_w, head_b], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def acc(x, y):
        right = 0
        for idx in batches(len(x), 500, False):
            _, lnf, _ = model(x[idx].to(dev))
            right += ((((lnf.mean(1) - mu) / sd) @ head_w + head_b).argmax(1).cpu() == y[idx]).sum().item()
        return 100.0 * right / len(x)

    history = [dict(epoch=0, step=0, val=acc(xva, yva))]
    best = (history[0]["val"], {k: v.detach().clone() for k, v in model.state_dict().items()},
            head_w.detach().clone(), head_b.detach().clone())
    step, epoch, start = 0, 0, time.time()
    xtr_d, ytr_d = xtr.to(dev), ytr.to(dev)
    while time.time() - start < budget:
        epoch += 1
        for idx in batches(len(xtr), batch, True, cpu_gen):
            if len(idx) < batch:
                continue
            tk = xtr_d[idx.to(dev)]
            if aug:
                tk = augment(tk, side, gen)
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            logits, lnf, _ = model(tk)
            gen_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tk.reshape(-1))
            clf_loss = F.cross_entropy(((lnf.mean(1) - mu) / sd) @ head_w + head_b, ytr_d[idx.to(dev)])
            opt.zero_grad(set_to_none=True)
            (gen_loss + clf_loss).backward()
            opt.step()
            step += 1
        history.append(dict(epoch=epoch, step=step, val=acc(xva, yva), seconds=round(time.time() - start, 1)))
        print(f"    lr {lr:g} batch {batch} epoch {epoch}: val {history[-1]['val']:.2f}%", flush=True)
        if history[-1]["val"] > best[0]:
            best = (history[-1]["val"], {k: v.detach().clone() for k, v in model.state_dict().items()},
                    head_w.detach().clone(), head_b.detach().clone())
    model.load_state_dict(best[1])
    head_w.data, head_b.data = best[2], best[3]
    best_epoch = max(history, key=lambda h: h["val"])["epoch"]
    return dict(lr=lr, batch=batch, aug=aug, epochs=epoch, steps=step, best_val=best[0], best_epoch=best_epoch,
                test=acc(xte, yte), history=history)


def pretrain(params, n_head, tokens, dev, lr, batch, budget, warmup=100, seed=0):
    """Continue pre-training (next-pixel loss, Adam beta2 0.95, grad clip 1): linear ramp, then
    cosine decay to zero over as many steps as the budget allows at the measured speed."""
    model = Igpt({k: v.clone() for k, v in params.items()}, n_head).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    x = tokens.to(dev)
    step, total, start, losses, t10 = 0, None, time.time(), [], None
    while total is None or step < total:
        for idx in batches(len(x), batch, True, gen):
            if len(idx) < batch:
                continue
            # Speed measured past the first steps, which pay for start-up (kernel choice, caches).
            if step == 10:
                t10 = time.time()
            if total is None and step == 40:
                total = max(41, 40 + int((budget - (t10 - start) - (time.time() - t10)) / ((time.time() - t10) / 30)))
            if total is not None and step >= total:
                break
            t = total or 10**9
            rate = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / t)))
            for group in opt.param_groups:
                group["lr"] = rate
            tk = x[idx.to(dev)]
            logits, _, _ = model(tk)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tk.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 500 == 0:
                losses.append((step, loss.item()))
    return {k.replace("__", "."): v.detach() for k, v in model.p.items()}, dict(
        steps=step, batch=batch, lr=lr, seconds=round(time.time() - start, 1), images=step * batch,
        losses=losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/fashion-ar")
    ap.add_argument("--test-tokens", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny subsets and budgets, to check the script")
    ap.add_argument("--finetune-budget", type=float, default=55)
    ap.add_argument("--pretrain-budget", type=float, default=110)
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4")
    ap.add_argument("--only-longer", type=float, metavar="LR",
                    help="skip to continued pre-training, then fine-tune it at this rate (no probes)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    results = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__)

    def save():
        json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)

    cfg = json.load(open(os.path.join(args.run, "config.json")))["model"]
    metrics = [json.loads(line) for line in open(os.path.join(args.run, "metrics.jsonl"))]
    igpt_nll = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
    results["igpt_val_nll"] = igpt_nll
    params = {k: v.float() for k, v in load_safetensors(os.path.join(args.run, "model.safetensors")).items()}
    xtr, ytr = read_tokens(os.path.join(args.run, "data", "train.tokens"))
    xva, yva = read_tokens(os.path.join(args.run, "data", "val.tokens"))
    tests = [read_tokens(p) for p in args.test_tokens]
    xte, yte = torch.cat([t[0] for t in tests]), torch.cat([t[1] for t in tests])
    if args.quick:
        xtr, ytr, xva, yva, xte, yte = xtr[:600], ytr[:600], xva[:200], yva[:200], xte[:200], yte[:200]
        args.finetune_budget, args.pretrain_budget, args.lrs = 2, 3, "1e-4"
    data = ((xtr, ytr), (xva, yva), (xte, yte))
    results["sizes"] = dict(train=len(xtr), val=len(xva), test=len(xte))

    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    model = Igpt(params, cfg["n_head"]).to(dev)
    results["val_nll"] = nll(model, xva, dev)
    print(f"held-out NLL: {results['val_nll']:.4f} nats/token (igpt's run: {igpt_nll:.4f})", flush=True)
    save()

    def probe_model(m, key):
        layers = list(range(m.n_layer + 1))
        f = [features(m, x, layers, dev) for x in (xtr, xva, xte)]
        results[key] = dict(concat=probe(f[0], ytr.to(dev), f[1], yva.to(dev), f[2], yte.to(dev)))
        print(f"  {key} all layers concatenated: {results[key]['concat']}", flush=True)
        save()

    # Most telling first: a timeout still leaves the earlier phases in results.json.
    torch.backends.cuda.matmul.allow_tf32 = True
    results["finetune"] = []
    for lr in [] if args.only_longer else [float(v) for v in args.lrs.split(",")]:
        r = finetune(params, cfg["n_head"], data, dev, lr, 128, args.finetune_budget)
        results["finetune"].append(r)
        print(f"  fine-tune lr {lr:g}: best val {r['best_val']:.2f}% (epoch {r['best_epoch']}), test {r['test']:.2f}%",
              flush=True)
        save()
    longer, info = pretrain(params, cfg["n_head"], xtr, dev, 1e-3, 16 if args.quick else 128, args.pretrain_budget)
    results["pretrain_more"] = info
    m2 = Igpt(longer, cfg["n_head"]).to(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    info["val_nll"] = nll(m2, xva, dev)
    print(f"continued pre-training: {info}", flush=True)
    save()
    if not args.only_longer:
        probe_model(model, "probe")
        probe_model(m2, "probe_more")
    torch.backends.cuda.matmul.allow_tf32 = True
    best_lr = args.only_longer or max(results["finetune"], key=lambda r: r["best_val"])["lr"]
    r = finetune(longer, cfg["n_head"], data, dev, best_lr, 128, args.finetune_budget)
    results["finetune_more"] = r
    print(f"  fine-tune of the longer-trained model, lr {best_lr:g}: best val {r['best_val']:.2f}%, "
          f"test {r['test']:.2f}%", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
