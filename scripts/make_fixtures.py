"""Writes tests/fixtures/reference_small.safetensors: an independent PyTorch implementation of
Image GPT (REFERENCE.md section 3) run on random parameters, in float64.

It holds the config (metadata), the parameters under igpt's tensor names and layouts, the
input tokens, the logits, the mean loss, and the gradient of the mean loss for every
parameter ("grad." + name). Run: python3 scripts/make_fixtures.py
"""
import json
import struct
import sys

import torch

torch.manual_seed(1234)
DT = torch.float64

CFG = dict(n_layer=2, n_embd=32, n_head=4, n_vocab=16, side=12, channels=1)
BATCH = 2


def make_params(cfg):
    d, v, t = cfg["n_embd"], cfg["n_vocab"], cfg["side"] ** 2
    p = {}

    def r(*shape, std=0.2):
        return (torch.randn(*shape, dtype=DT) * std).requires_grad_()

    p["wte"] = r(v, d)
    p["wpe"] = r(t, d, std=0.1)
    p["sos"] = r(d)
    for i in range(cfg["n_layer"]):
        p[f"h.{i}.ln_1.g"] = (1 + r(d, std=0.1)).detach().requires_grad_()
        p[f"h.{i}.attn.c_attn.w"] = r(d, 3 * d)
        p[f"h.{i}.attn.c_proj.w"] = r(d, d)
        p[f"h.{i}.ln_2.g"] = (1 + r(d, std=0.1)).detach().requires_grad_()
        p[f"h.{i}.mlp.c_fc.w"] = r(d, 4 * d)
        p[f"h.{i}.mlp.c_proj.w"] = r(4 * d, d)
    p["ln_f.g"] = (1 + r(d, std=0.1)).detach().requires_grad_()
    p["wtet"] = r(v, d)
    return p


def norm(x, g):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g


def model(p, cfg, tokens):
    b, t = tokens.shape
    d, h = cfg["n_embd"], cfg["n_head"]
    hd = d // h
    emb = p["wte"][tokens[:, :-1]]  # inputs are shifted right by one
    sos = p["sos"].expand(b, 1, d)
    x = torch.cat([sos, emb], dim=1) + p["wpe"][:t]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        a = norm(x, p[f"h.{i}.ln_1.g"])
        q, k, v = (a @ p[f"h.{i}.attn.c_attn.w"]).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, hd).transpose(1, 2) for z in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / hd**0.5
        s = s.masked_fill(~mask, float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ p[f"h.{i}.attn.c_proj.w"]
        m = norm(x, p[f"h.{i}.ln_2.g"]) @ p[f"h.{i}.mlp.c_fc.w"]
        m = m * torch.sigmoid(1.702 * m)
        x = x + m @ p[f"h.{i}.mlp.c_proj.w"]
    x = norm(x, p["ln_f.g"])
    return x @ p["wtet"].T


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)


def f32(t):
    t = t.detach().to(torch.float32).contiguous()
    return ("F32", list(t.shape), t.numpy().tobytes())


def main(out):
    p = make_params(CFG)
    t = CFG["side"] ** 2
    tokens = torch.randint(0, CFG["n_vocab"], (BATCH, t))
    # Round the parameters to float32 first so both sides start from identical values.
    for k in p:
        p[k] = p[k].detach().to(torch.float32).to(DT).requires_grad_()
    logits = model(p, CFG, tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG["n_vocab"]), tokens.reshape(-1))
    loss.backward()
    tensors = {"tokens": ("I32", list(tokens.shape), tokens.to(torch.int32).numpy().tobytes())}
    tensors["logits"] = f32(logits)
    tensors["loss"] = f32(loss.reshape(1))
    for k, v in p.items():
        tensors[k] = f32(v)
        tensors["grad." + k] = f32(v.grad)
    meta = {k: str(v) for k, v in CFG.items()}
    write_safetensors(out, tensors, meta)
    print(f"wrote {out}: loss {loss.item():.6f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/reference_small.safetensors")
