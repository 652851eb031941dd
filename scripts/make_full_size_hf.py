"""Writes a randomly initialised Hugging Face ImageGPT with a released model's shape, to measure
loading time, memory and logits speed without downloading (these machines are offline).

    python scripts/make_full_size_hf.py OUT_DIR [small|medium|large]

OUT_DIR gets config.json, preprocessor_config.json (512 random clusters) and pytorch_model.bin
(a torch zip like the hub's), and OUT_DIR-safetensors the same weights as model.safetensors.
"""

import os
import shutil
import sys

import numpy as np
import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

SHAPES = {"small": (24, 512, 8), "medium": (36, 1024, 8), "large": (48, 1536, 16)}


def main():
    out, size = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "small")
    n_layer, d, n_head = SHAPES[size]
    torch.manual_seed(0)
    cfg = ImageGPTConfig(vocab_size=513, n_positions=1024, n_embd=d, n_layer=n_layer, n_head=n_head,
                         tie_word_embeddings=False)
    model = ImageGPTForCausalImageModeling(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(".bias"):
                p.normal_(0, 0.02 if p.dim() == 2 else 1.0).add_(1.0 if p.dim() == 1 else 0.0)
    os.makedirs(out, exist_ok=True)
    model.config.save_pretrained(out)
    clusters = np.random.default_rng(0).uniform(-1, 1, (512, 3)).round(6)
    ImageGPTImageProcessor(clusters=clusters.tolist(), size={"height": 32, "width": 32}).save_pretrained(out)
    torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))
    st = out.rstrip("/") + "-safetensors"
    shutil.rmtree(st, ignore_errors=True)
    model.save_pretrained(st)
    shutil.copy(os.path.join(out, "preprocessor_config.json"), st)
    print(out, st, sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
