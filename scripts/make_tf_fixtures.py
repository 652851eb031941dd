"""Writes tiny TensorFlow checkpoints with OpenAI's Image GPT variable names, for igpt's tests.

tests/fixtures/tf/igpt-tiny/       autoregressive
tests/fixtures/tf/igpt-tiny-bert/  masked objective ("bert" in the path marks it, as OpenAI's names do)
Each holds model.ckpt-1000.index + two data shards (TensorFlow's tensor-bundle format, written by
tf.compat.v1.train.Saver with sharding), kmeans_centers.npy, and expected.safetensors:
    pixels [N, n_ctx] int64, mask [N, n_ctx] int64 (BERT: 1 = masked), logits [N, n_ctx, 16] float32
computed by a float64 NumPy implementation of the official model (REFERENCE.md §3-4). The
autoregressive logits are also checked against transformers' ImageGPT after the published
TF-to-HF mapping, so the reference and the mapping agree.

Run: python scripts/make_tf_fixtures.py   (needs tensorflow, numpy, safetensors; torch and
transformers for the cross-check)
"""

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tf")
N_LAYER, D, N_HEAD, SIDE, V = 2, 32, 4, 6, 16
N_CTX = SIDE * SIDE
HD = D // N_HEAD


def random_weights(rng):
    w = {
        "model/wte": rng.normal(0, 0.5, (V, D)),
        "model/wtet": rng.normal(0, 0.5, (V, D)),
        "model/wpe": rng.normal(0, 0.3, (N_CTX, D)),
        "model/sos": rng.normal(0, 0.5, (D,)),
        "model/ln_f/g": 1 + 0.2 * rng.normal(size=(D,)),
    }
    for i in range(N_LAYER):
        p = f"model/h{i}/"
        w[p + "ln_1/g"] = 1 + 0.2 * rng.normal(size=(D,))
        w[p + "ln_2/g"] = 1 + 0.2 * rng.normal(size=(D,))
        for name in ["q_proj", "k_proj", "v_proj", "c_proj"]:
            w[p + "attn/" + name] = rng.normal(0, 1.5 / np.sqrt(D), (N_HEAD, HD, D))
        w[p + "mlp/c_fc/w"] = rng.normal(0, 1.5 / np.sqrt(D), (D, 4 * D))
        w[p + "mlp/c_proj/w"] = rng.normal(0, 1.5 / np.sqrt(4 * D), (4 * D, D))
    return {k: v.astype(np.float32) for k, v in w.items()}


def norm(x, g):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g


def reference_logits(w, pixels, bert, mask):
    """The official model in float64: pixels [N, T] -> logits [N, T, V]."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    h = w["model/wte"][pixels]
    if bert:
        h = h * (1 - mask[..., None])
    else:
        sos = np.broadcast_to(w["model/sos"], (pixels.shape[0], 1, D))
        h = np.concatenate([sos, h[:, :-1]], axis=1)
    h = h + w["model/wpe"][None, : pixels.shape[1]]
    t = pixels.shape[1]
    for i in range(N_LAYER):
        p = f"model/h{i}/"
        x = norm(h, w[p + "ln_1/g"])
        q, k, v = (np.einsum("ntd,hkd->nhtk", x, w[p + "attn/" + s]) for s in ["q_proj", "k_proj", "v_proj"])
        s = np.einsum("nhtk,nhuk->nhtu", q, k) / np.sqrt(HD)
        if not bert:
            s = np.where(np.tril(np.ones((t, t), bool)), s, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = np.einsum("nhtu,nhuk->nthk", s, v)
        h = h + np.einsum("nthk,hko->nto", a, w[p + "attn/c_proj"])
        x = norm(h, w[p + "ln_2/g"])
        f = x @ w[p + "mlp/c_fc/w"]
        f = f / (1 + np.exp(-1.702 * f))
        h = h + f @ w[p + "mlp/c_proj/w"]
    h = norm(h, w["model/ln_f/g"])
    return h @ w["model/wtet"].T


def save_checkpoint(w, out):
    """Two shards: variables alternate between two CPU devices and the Saver shards by device."""
    import tensorflow as tf
    tf.compat.v1.reset_default_graph()
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for n, (name, value) in enumerate(sorted(w.items())):
            with tf.device(f"/cpu:{n % 2}"):
                variables.append(tf.compat.v1.get_variable(name, initializer=value))
                if name in ("model/wte", "model/h0/mlp/c_fc/w"):
                    # Optimizer slots sit beside the weights in the released checkpoints.
                    tf.compat.v1.get_variable(name + "/Adam", initializer=np.zeros_like(value))
                    tf.compat.v1.get_variable(name + "/Adam_1", initializer=np.ones_like(value))
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(out, "model.ckpt"), global_step=1000, write_meta_graph=False)
    for extra in ["checkpoint"]:
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)


def cross_check_with_transformers(w, centers, pixels, logits):
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    cfg = ImageGPTConfig(vocab_size=V + 1, n_positions=N_CTX, n_embd=D, n_layer=N_LAYER, n_head=N_HEAD,
                         tie_word_embeddings=False)
    m = ImageGPTForCausalImageModeling(cfg).double().eval()
    sd = m.state_dict()
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        sd["transformer.wte.weight"][:V] = t(w["model/wte"])
        sd["transformer.wte.weight"][V] = t(w["model/sos"])
        sd["transformer.wpe.weight"][:] = t(w["model/wpe"])
        sd["transformer.ln_f.weight"][:] = t(w["model/ln_f/g"])
        sd["lm_head.weight"][:] = t(w["model/wtet"])
        for i in range(N_LAYER):
            p, h = f"model/h{i}/", f"transformer.h.{i}."
            sd[h + "ln_1.weight"][:] = t(w[p + "ln_1/g"])
            sd[h + "ln_2.weight"][:] = t(w[p + "ln_2/g"])
            for j, s in enumerate(["q_proj", "k_proj", "v_proj"]):
                sd[h + "attn.c_attn.weight"][:, j * D:(j + 1) * D] = t(w[p + "attn/" + s].reshape(D, D).T)
            sd[h + "attn.c_proj.weight"][:] = t(w[p + "attn/c_proj"].reshape(D, D))
            sd[h + "mlp.c_fc.weight"][:] = t(w[p + "mlp/c_fc/w"])
            sd[h + "mlp.c_proj.weight"][:] = t(w[p + "mlp/c_proj/w"])
            for b in ["attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]:
                sd[h + b].zero_()
        ids = torch.tensor(np.concatenate([np.full((len(pixels), 1), V), pixels[:, :-1]], axis=1))
        hf = m(ids).logits.numpy()
    err = np.abs(hf - logits).max()
    assert err < 1e-9, f"NumPy reference and transformers disagree by {err}"
    print(f"  reference == transformers after the TF->HF mapping (max diff {err:.2e})")


def main():
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    centers = rng.uniform(-1, 1, (V, 3)).astype(np.float32)
    for bert in [False, True]:
        w = random_weights(rng)
        out = os.path.join(ROOT, "igpt-tiny-bert" if bert else "igpt-tiny")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        save_checkpoint(w, out)
        np.save(os.path.join(out, "kmeans_centers.npy"), centers)
        pixels = rng.integers(0, V, (3, N_CTX))
        mask = (rng.uniform(size=(3, N_CTX)) < 0.15).astype(np.int64) if bert else np.zeros((3, N_CTX), np.int64)
        logits = reference_logits(w, pixels, bert, mask)
        if not bert:
            # TensorFlow and torch cannot share a process (their bundled LLVMs clash).
            with tempfile.TemporaryDirectory() as tmp:
                np.savez(os.path.join(tmp, "w.npz"), pixels=pixels, logits=logits, **w)
                subprocess.run([sys.executable, __file__, "--cross-check", os.path.join(tmp, "w.npz")], check=True)
        save_file(
            {"pixels": pixels.astype(np.int64), "mask": mask, "logits": logits.astype(np.float32)},
            os.path.join(out, "expected.safetensors"),
        )
        print(out, sorted(os.listdir(out)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cross-check":
        z = dict(np.load(sys.argv[2]))
        pixels, logits = z.pop("pixels"), z.pop("logits")
        cross_check_with_transformers(z, None, pixels, logits)
    else:
        main()
