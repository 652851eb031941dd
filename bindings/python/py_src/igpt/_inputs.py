"""Inputs as the native module takes them: images as uint8 arrays, token ids as int64 arrays.

Every array handed on is a fresh copy: the native code reads it with the GIL released, so no
other Python thread may hold (and change) the buffer meanwhile.

PIL images become arrays by the rules the Rust decoder applies to image files (``igpt encode``):
gray stays gray, RGB stays RGB, an alpha channel is kept here and dropped by the native code
(not composited), palette images are expanded to RGB, 1-bit images to 0/255 gray, 16-bit gray
is rounded to 8 bits, and any other mode is converted to RGB by Pillow. (Pillow itself reads
16-bit colour PNGs as 8-bit by their high byte, where the Rust decoder rounds.)
"""

import numpy as np

_AS_IS = ("L", "LA", "RGB", "RGBA")


def _is_pil(obj):
    return hasattr(obj, "mode") and hasattr(obj, "convert") and hasattr(obj, "size")


def _pil_array(img):
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit gray: rounded to 8 bits as the Rust decoder rounds (round(v * 255 / 65535)).
        wide = np.asarray(img).astype(np.int64)
        return np.ascontiguousarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8))
    if mode not in _AS_IS:
        if mode == "1":
            img = img.convert("L")
        elif mode in ("P", "PA"):
            img = img.convert("RGBA")
        else:
            img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _array(obj, i):
    a = np.asarray(obj)
    if a.dtype != np.uint8:
        raise ValueError(
            f"image {i}: pixels must be uint8 (got {a.dtype}); token ids go to the methods "
            "that take ids as an integer array [N, T] of another type"
        )
    if a.ndim not in (2, 3):
        raise ValueError(f"image {i}: expected (H, W) or (H, W, C) pixels, got shape {a.shape}")
    if a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"image {i}: {a.shape[2]} channels; images have 1 (gray), 3 (RGB) or 4 (RGBA)"
        )
    return np.array(a, order="C", copy=True)


def images(obj):
    """A list of C-contiguous uint8 arrays (H, W) or (H, W, C) from: one PIL image or array,
    a sequence of them, or one stacked array (N, H, W) or (N, H, W, C). A 3-D array is one
    image when its last axis can be channels (1 to 4), else a stack of gray images: pass a list
    to say which."""
    if _is_pil(obj):
        return [_pil_array(obj)]
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 arrays (got {obj.dtype}); pass token ids as an "
                "integer array [N, T] to a method that takes ids"
            )
        if obj.ndim == 4 or (obj.ndim == 3 and obj.shape[-1] not in (1, 2, 3, 4)):
            stacked = np.array(obj, order="C", copy=True)
            return [stacked[i] for i in range(stacked.shape[0])]
        return [_array(obj, 0)]
    if isinstance(obj, (str, bytes)):
        raise ValueError("images must be PIL images or uint8 arrays, not a string or path")
    try:
        items = list(obj)
    except TypeError:
        raise ValueError(
            f"images must be PIL images or uint8 arrays, not {type(obj).__name__}"
        ) from None
    return [_pil_array(x) if _is_pil(x) else _array(x, i) for i, x in enumerate(items)]


def is_ids(obj):
    """Whether ``obj`` holds token ids rather than pixels: an integer array other than uint8."""
    if not isinstance(obj, np.ndarray):
        return False
    return np.issubdtype(obj.dtype, np.integer) and obj.dtype != np.uint8


def ids(obj):
    """Token ids as a C-contiguous int64 array [N, T] (one sequence [T] becomes [1, T])."""
    a = np.asarray(obj)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"token ids must be [N, T], got shape {a.shape}")
    return np.array(a, dtype=np.int64, order="C", copy=True)
