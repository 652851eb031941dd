"""Writes small Hugging Face ImageGPT models and their outputs for igpt's tests.

For each of two random configs this writes tests/fixtures/hf/<name>/ with
  config.json, preprocessor_config.json   (as transformers writes them)
  model.safetensors                        (save_pretrained)
  pytorch_model.bin                        (torch.save of the state dict, causal-mask buffers included)
  expected.safetensors                     inputs and outputs computed by transformers in float64:
      raw_ids      [N, T]  ids fed as they are (HF convention; some start with the start token)
      raw_logits   [N, T, V]
      raw_hidden_{l} for a few l (HF's output_hidden_states indexing)
      pixels       [N, n_positions]  pixel ids
      sos_logits   [N, n_positions, V]  logits of [start, pixels[:-1]]: position i predicts pixel i

Run: python scripts/make_hf_fixtures.py   (needs torch, transformers, safetensors)
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")

CONFIGS = {
    # name: (n_layer, n_embd, n_head, side, colours)
    "small-a": (2, 32, 4, 8, 16),
    "small-b": (3, 32, 2, 10, 32),
}


def randomise(model, gen):
    """Every weight random and large enough that errors show; biases stay zero (no biases in iGPT)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[0] if p.dim() == 2 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / np.sqrt(max(fan_in, 1))))


def main():
    for seed, (name, (n_layer, d, n_head, side, k)) in enumerate(CONFIGS.items()):
        gen = torch.Generator().manual_seed(100 + seed)
        out = os.path.join(ROOT, name)
        os.makedirs(out, exist_ok=True)
        cfg = ImageGPTConfig(
            vocab_size=k + 1,
            n_positions=side * side,
            n_embd=d,
            n_layer=n_layer,
            n_head=n_head,
            tie_word_embeddings=False,
        )
        model = ImageGPTForCausalImageModeling(cfg).eval()
        randomise(model, gen)
        model.save_pretrained(out)
        clusters = (torch.rand((k, 3), generator=gen) * 2 - 1).numpy().round(6)
        proc = ImageGPTImageProcessor(clusters=clusters.tolist(), size={"height": side, "width": side})
        proc.save_pretrained(out)

        sd = {k_: v.contiguous() for k_, v in model.state_dict().items()}
        n = side * side
        for i in range(n_layer):
            sd.setdefault(
                f"transformer.h.{i}.attn.bias",
                torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n),
            )
            sd.setdefault(f"transformer.h.{i}.attn.masked_bias", torch.tensor(-1e4))
        torch.save(sd, os.path.join(out, "pytorch_model.bin"))

        ref = model.double()
        batch = 3
        t_raw = n - 7  # shorter than the context: callers need not pad
        raw = torch.randint(0, k, (batch, t_raw), generator=gen)
        raw[0, 0] = k  # HF's start token
        pixels = torch.randint(0, k, (batch, n), generator=gen)
        with torch.no_grad():
            o = ref(raw, output_hidden_states=True)
            start = torch.full((batch, 1), k)
            sos_logits = ref(torch.cat([start, pixels[:, :-1]], dim=1)).logits
        tensors = {
            "raw_ids": raw.to(torch.int64),
            "raw_logits": o.logits.float(),
            "pixels": pixels.to(torch.int64),
            "sos_logits": sos_logits.float(),
        }
        for layer in sorted({0, 1, n_layer}):
            tensors[f"raw_hidden_{layer}"] = o.hidden_states[layer].float()
        save_file({k_: v.contiguous() for k_, v in tensors.items()}, os.path.join(out, "expected.safetensors"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")


if __name__ == "__main__":
    sys.exit(main())
