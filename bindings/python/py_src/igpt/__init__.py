"""igpt: Image GPT in Rust, from Python.

Load a model (an igpt run, a Hugging Face ImageGPT directory, an OpenAI TensorFlow checkpoint or
a hub name) and encode, score, sample, complete or extract features with numpy arrays in and
out; train and fine-tune with a callback per step. The types and documentation are in
``__init__.pyi``.
"""

from ._igpt import (
    Model,
    __version__,
    finetune,
    finetune_defaults,
    load_data,
    train,
    train_defaults,
)

__all__ = [
    "Model",
    "__version__",
    "finetune",
    "finetune_defaults",
    "load_data",
    "train",
    "train_defaults",
]
