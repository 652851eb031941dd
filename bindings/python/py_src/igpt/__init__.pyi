"""igpt: Image GPT in Rust, from Python.

Images go in as PIL images or uint8 numpy arrays: (H, W) gray, (H, W, C) with C = 1, 3 or 4
(an alpha channel is dropped, as ``igpt encode`` drops it from files), a sequence of those, or
one stacked array (N, H, W) or (N, H, W, C). Each is resized to the model's side by the
library's one image-to-tokens path (Pillow's BILINEAR resize, then the palette), so the ids are
those of ``igpt encode`` and of Hugging Face's ImageGPTImageProcessor.

Token ids are integer arrays [N, T] of any integer type but uint8 (uint8 means pixels); one
sequence [T] is taken as [1, T]. Pixel ids (the default) are the image's pixels in raster order:
the start token goes in front and position i predicts pixel i. With ``raw=True`` they are fed
exactly as Hugging Face's model takes them (id ``colours`` is the start token).

Every call that computes releases the GIL and can be stopped with Ctrl-C (KeyboardInterrupt)
at its next batch, row of pixels or training step. Errors: FileNotFoundError for a missing
model, data set or file; MemoryError when the work would not fit in memory; ValueError with
igpt's message for bad input.
"""

from os import PathLike
from typing import Callable, List, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt
from PIL.Image import Image as PILImage  # for types only: Pillow is optional at run time

__version__: str

ImageLike = Union[PILImage, npt.NDArray[np.uint8]]
Images = Union[ImageLike, Sequence[ImageLike]]
Ids = npt.NDArray[np.integer]
StepCallback = Callable[[int, float, float], object]

class Model:
    """An Image GPT model with its palette. Its parameters are held once, by whatever computed
    last (an engine or a sampler), and handed between them without a copy. One call at a time
    per model (a second thread gets RuntimeError)."""

    @staticmethod
    def load(
        path_or_name: Union[str, PathLike],
        device: str = "cpu",
        precision: Optional[str] = None,
    ) -> "Model":
        """Loads an igpt run directory, a Hugging Face ImageGPT directory (safetensors or
        pytorch_model.bin), an OpenAI TensorFlow checkpoint (``.../model.ckpt-N``), or a hub
        name (``openai/imagegpt-small``, ``openai-tf/igpt-s-bert``; downloaded once).

        ``device``: where the model computes ("cpu", or "cuda" / "cuda:N" for an NVIDIA GPU,
        as the command line's ``--device``). ``precision``: "bf16" or "f32" for sampling,
        completion and scores (default: bf16 on a GPU or where the CPU multiplies bf16
        natively, else f32, as the command line); logits, hidden states and features are always f32."""
        ...
    @property
    def side(self) -> int:
        """Image side in pixels: the model reads side x side images (side * side tokens)."""
    @property
    def channels(self) -> int:
        """Colour channels: 1 (gray) or 3 (RGB)."""
    @property
    def colours(self) -> int:
        """Palette size: the number of token ids."""
    @property
    def layers(self) -> int:
        """Transformer blocks."""
    @property
    def width(self) -> int:
        """Embedding width d (the size of one layer's features)."""
    @property
    def heads(self) -> int:
        """Attention heads."""
    @property
    def objective(self) -> str:
        """"autoregressive" or "bert"."""
    @property
    def n_params(self) -> int:
        """Number of parameters."""
    @property
    def precision(self) -> str:
        """Precision of sampling, completion and scores: "bf16" or "f32"."""
    @property
    def name(self) -> str:
        """What the model was loaded from."""
    @property
    def palette(self) -> npt.NDArray[np.float32]:
        """The palette's colours in [-1, 1], float32 [colours, channels]."""
    def encode(self, images: Images) -> npt.NDArray[np.int64]:
        """Images to token ids, int64 [N, side * side], identical to ``igpt encode``."""
        ...
    def decode(self, ids: Ids) -> npt.NDArray[np.uint8]:
        """Token ids [N, side * side] to images, uint8 [N, side, side, channels]."""
        ...
    def logits(self, ids: Ids, raw: bool = False, batch: int = 8) -> npt.NDArray[np.float32]:
        """Logits over the palette, float32 [N, T, colours], as ``igpt logits`` (``--raw``).
        T may be shorter than side * side for autoregressive models; BERT models take whole
        images, with -1 marking a masked pixel. ``batch``: sequences per forward pass."""
        ...
    def hidden_states(
        self, ids: Ids, layer: int, raw: bool = False, batch: int = 8
    ) -> npt.NDArray[np.float32]:
        """A hidden state, float32 [N, T, width], numbered as Hugging Face's
        output_hidden_states: 0 = embeddings, l = after block l-1, ``layers`` = after the
        final norm (``igpt logits --hidden``)."""
        ...
    def features(
        self,
        images_or_ids: Union[Images, Ids],
        layers: Optional[Sequence[int]] = None,
        masks: Optional[int] = None,
        batch: int = 32,
    ) -> npt.NDArray[np.float32]:
        """Linear-probe features, float32 [N, len(layers) * width], ready for scikit-learn:
        equal to ``igpt features`` (its ``features`` tensor). Layer l is the normalised input
        of block l, averaged over positions; layer ``layers`` is the final norm's output.
        ``layers``: default all (0..=layers). ``masks``: BERT models average over this many
        random masks per image (default 5; 0 reads whole images)."""
        ...
    def score(
        self, images_or_ids: Union[Images, Ids], batch: int = 16
    ) -> npt.NDArray[np.float64]:
        """Each image's mean negative log-likelihood in nats per token, float64 [N], equal to
        ``igpt score`` (autoregressive models)."""
        ...
    def sample(
        self,
        n: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch: int = 16,
        return_tokens: bool = False,
    ) -> Union[npt.NDArray[np.uint8], Tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]]:
        """Generates ``n`` images, uint8 [n, side, side, channels]; with ``return_tokens``
        also their ids, int64 [n, side * side]. The same seed gives the same images, whatever
        the batch, and the same as ``igpt sample --seed``. ``temperature`` 0 is greedy;
        ``top_k`` 0 and ``top_p`` 1 keep every colour."""
        ...
    def complete(
        self,
        images: Images,
        rows: Optional[int] = None,
        prefix_pixels: Optional[int] = None,
        k: int = 4,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch: int = 16,
        return_tokens: bool = False,
    ) -> Union[npt.NDArray[np.uint8], Tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]]:
        """Completes each image from its top ``rows`` (default half the image) or its first
        ``prefix_pixels`` pixels, ``k`` times: uint8 [n, k, side, side, channels]; with
        ``return_tokens`` also the ids, int64 [n, k, side * side]. Equal to ``igpt complete``
        with the same seed."""
        ...

class TrainSummary(TypedDict):
    steps: int
    final_train_loss: float
    val_loss: Optional[float]
    seconds: float
    tokens_per_s: float
    losses: List[float]

class FinetuneSummary(TypedDict):
    best_val_accuracy: float
    best_step: int
    steps_run: int
    early_stop: bool
    train_images: int
    val_images: int
    test_accuracy: Optional[float]

def train(
    out: Optional[Union[str, PathLike]] = None,
    *,
    resume: Optional[Union[str, PathLike]] = None,
    data: Optional[str] = None,
    format: Optional[str] = None,
    val_data: Optional[str] = None,
    val_fraction: Optional[float] = None,
    limit: Optional[int] = None,
    preset: Optional[str] = None,
    layers: Optional[int] = None,
    embd: Optional[int] = None,
    heads: Optional[int] = None,
    objective: Optional[str] = None,
    side: Optional[int] = None,
    channels: Optional[int] = None,
    palette: Optional[Union[str, PathLike]] = None,
    palette_size: Optional[int] = None,
    steps: Optional[int] = None,
    batch: Optional[int] = None,
    micro_batch: Optional[int] = None,
    lr: Optional[float] = None,
    warmup: Optional[int] = None,
    beta1: Optional[float] = None,
    beta2: Optional[float] = None,
    weight_decay: Optional[float] = None,
    clip: Optional[float] = None,
    eval_every: Optional[int] = None,
    eval_images: Optional[int] = None,
    checkpoint_every: Optional[int] = None,
    seed: Optional[int] = None,
    stop_after: Optional[int] = None,
    callback: Optional[StepCallback] = None,
    verbose: bool = False,
    device: str = "cpu",
) -> TrainSummary:
    """Trains a new run in ``out`` (or continues the run ``resume`` from its last checkpoint),
    exactly as ``igpt train`` with the flags of the same names (``--val-data`` is
    ``val_data`` and so on): the same settings give the same losses in ``metrics.jsonl``.
    Left out, a setting takes the command's default (``train_defaults()``): data
    "fashion-mnist", preset "tiny", 1000 steps of 8 images, lr 3e-3 after 100 warm-up steps,
    a palette fitted on the training split. ``format``: auto, idx, cifar10, cifar100, folder
    or npy. ``objective``: autoregressive or bert.

    ``callback(step, loss, tokens_per_s)`` is called after every step (loss in nats per
    token); an exception it raises stops training there and is raised. Ctrl-C stops at the
    end of the current step. Either way a checkpoint of that step is written, so the run can be
    resumed. ``verbose`` prints the run's messages."""
    ...

def finetune(
    model: Union[str, PathLike],
    data: str,
    out: Union[str, PathLike],
    *,
    labels: Optional[Union[str, PathLike]] = None,
    test_data: Optional[str] = None,
    test_labels: Optional[Union[str, PathLike]] = None,
    limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    steps: Optional[int] = None,
    batch: Optional[int] = None,
    micro_batch: Optional[int] = None,
    lr: Optional[float] = None,
    warmup: Optional[int] = None,
    head_lr: Optional[float] = None,
    clf_only: bool = False,
    zero_head: bool = False,
    probe_images: Optional[int] = None,
    pad_crop: Optional[int] = None,
    flip: bool = False,
    eval_every: Optional[int] = None,
    patience: Optional[int] = None,
    masks: Optional[int] = None,
    val_fraction: Optional[float] = None,
    seed: Optional[int] = None,
    callback: Optional[StepCallback] = None,
    verbose: bool = False,
    device: str = "cpu",
) -> FinetuneSummary:
    """Fine-tunes ``model`` with a linear classification head on labelled ``data`` into
    ``out``, exactly as ``igpt finetune`` with the flags of the same names (defaults:
    ``finetune_defaults()``). ``callback(step, loss, tokens_per_s)`` is called after every
    step, with loss = L_GEN + L_CLF (L_CLF alone with ``clf_only``); an exception it raises,
    or Ctrl-C, stops fine-tuning there (the best model so far stays in ``out``). With
    ``test_data``, the best checkpoint's accuracy on it is in the summary."""
    ...

def load_data(
    spec: str = "fashion-mnist",
    format: str = "auto",
    labels: Optional[Union[str, PathLike]] = None,
    limit: Optional[int] = None,
) -> Tuple[npt.NDArray[np.uint8], Optional[npt.NDArray[np.int64]]]:
    """A data set as igpt reads it: images uint8 [N, H, W] (gray) or [N, H, W, 3], and labels
    int64 [N] or None. ``spec``: "fashion-mnist" (the shipped 10,000-image test split), an IDX
    file, a CIFAR binary, a folder of images or an .npy file. ``limit``: the first N images."""
    ...

def train_defaults() -> dict:
    """The defaults ``train`` fills in (those of ``igpt train``), from the library."""
    ...

def finetune_defaults() -> dict:
    """The defaults ``finetune`` fills in (those of ``igpt finetune``), from the library."""
    ...
