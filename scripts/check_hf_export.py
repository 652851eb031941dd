"""Checks an `igpt convert --to hf` directory with transformers itself.

    python scripts/check_hf_export.py HF_DIR IGPT_BINARY [IMAGE ...]

Loads HF_DIR with ImageGPTForCausalImageModeling.from_pretrained and ImageGPTImageProcessor,
encodes the images (or random ids when none are given), runs both transformers and
`igpt logits --raw` on the same ids, and prints the largest logit difference. Exits non-zero
when the ids or logits differ (ids must be identical, logits within 1e-4).
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import ImageGPTForCausalImageModeling
from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil


def main():
    hf_dir, igpt = sys.argv[1], sys.argv[2]
    images = sys.argv[3:]
    model = ImageGPTForCausalImageModeling.from_pretrained(hf_dir).eval()
    proc = ImageGPTImageProcessorPil.from_pretrained(hf_dir)
    v = model.config.vocab_size - 1
    with tempfile.TemporaryDirectory() as tmp:
        if images:
            ids = np.stack([proc(Image.open(f).convert("RGB"), return_tensors="np")["input_ids"][0] for f in images])
            ours_path = os.path.join(tmp, "ours.npy")
            subprocess.run([igpt, "encode", "--model", hf_dir, *images, "--out", ours_path], check=True)
            ours = np.load(ours_path)
            assert (ours == ids).all(), f"{(ours != ids).sum()} token ids differ"
            print(f"token ids identical for {len(images)} image(s)")
        else:
            ids = np.random.default_rng(0).integers(0, v, (4, model.config.n_positions))
        ids = np.concatenate([np.full((len(ids), 1), v), ids[:, :-1]], axis=1)  # start token first
        np.save(os.path.join(tmp, "ids.npy"), ids.astype(np.int64))
        with torch.no_grad():
            theirs = model(torch.tensor(ids)).logits.numpy()
        subprocess.run(
            [igpt, "logits", "--model", hf_dir, "--raw", "--tokens", os.path.join(tmp, "ids.npy"),
             "--out", os.path.join(tmp, "logits.npy")],
            check=True,
        )
        ours = np.load(os.path.join(tmp, "logits.npy"))
    diff = float(np.abs(ours - theirs).max())
    print(f"transformers loaded {hf_dir}: logits {theirs.shape}, max |igpt - transformers| = {diff:.2e}")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
