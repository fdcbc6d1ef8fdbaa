"""Fused mean-field CRF kernel for MAL as a torch custom op.

``torch.ops.mal.mean_field(image, prob, box_mask, iters, zeta=0.5, omega=2.0)``

* image: [B,C,H,W] float32/float16/bfloat16 (accumulated in float32)
* prob:  [B,H,W]   float32/float16/bfloat16, foreground probability
* box_mask: [B,H,W] bool/uint8/float32/float16/bfloat16 or None; nonzero = inside
* returns Q: [B,H,W] **float32** on the input device (hard labels: Q > 0.5)

No autograd: the op produces pseudo-labels.  Its output never requires grad
(an Autograd kernel redispatches below autograd), and :func:`mean_field` also
runs under ``torch.no_grad()``.

Two extension modules are JIT-built with ninja and cached under
``$MAL_CRF_CACHE`` (default ``~/.cache/mal_crf_ext``), one folder per
flavour and hash of (sources, flags, torch version, CUDA archs):

* ``mal_crf_cpu``: schema (TORCH_LIBRARY), CPU and Autograd kernels;
* ``mal_crf_cuda``: CUDA kernel only (TORCH_LIBRARY_IMPL(mal, CUDA)).  Built
  wherever nvcc and a CUDA build of torch exist, also without a GPU.

For tests only, :func:`cuda_emu` builds a third flavour: the same CUDA kernels
and launcher compiled as host C++ on the emulator in ``cuda_emu.h`` (ops
``torch.ops.mal_cuda_emu.*`` on CPU tensors).  :func:`load` never builds it.

Loading never raises: failures are recorded and reported by :func:`status`
and :func:`unavailable_reason`.  Everything is cached per process.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Optional, Union

import torch

from . import build
from .build import cuda_buildable, find_cuda_home

__all__ = ["load", "mean_field", "available", "status", "unavailable_reason",
           "find_cuda_home", "cuda_buildable", "cuda_emu"]

log = logging.getLogger("crf_ext")

_lock = threading.RLock()
# flavour -> {"loaded": bool, "error": str|None, "build_s": float|None,
#             "cached": bool, "path": str|None}
_state: Dict[str, dict] = {}


def _ensure(flavour: str, force: bool = False) -> dict:
    with _lock:
        if flavour not in _state or (force and not _state[flavour]["loaded"]):
            st = _build_after_schema(flavour, force)
            _state[flavour] = st
            if st["loaded"]:
                if flavour == "cpu":
                    _register_fake()
                how = ("loaded from cache" if st["cached"]
                       else f"built in {st['build_s']:.1f}s")
                log.info("crf_ext: %s kernel %s (%s)", flavour, how, st["path"])
            else:
                log.info("crf_ext: %s kernel unavailable: %s", flavour, st["error"])
        return _state[flavour]


def _build_after_schema(flavour: str, force: bool) -> dict:
    """build.build, the CUDA flavour only where it can be built and after the CPU one (the schema)."""
    if flavour == "cuda":
        why = cuda_buildable()
        cpu = _ensure("cpu")
        if why or not cpu["loaded"]:
            return {"loaded": False, "error": why or "CPU module (schema) failed: " + str(cpu["error"]),
                    "build_s": None, "cached": False, "path": None}
    return build.build(flavour, force=force)


def load(cuda: Optional[bool] = None) -> Dict[str, bool]:
    """Build/load the extension(s); never raises.

    cuda=None: load the CUDA flavour if it is buildable here (nvcc + CUDA
    torch); True: try it and record why it failed; False: CPU only.
    Returns {"cpu": bool, "cuda": bool} (what is loaded); reasons: status().
    """
    res = {"cpu": _ensure("cpu")["loaded"], "cuda": False}
    if cuda or (cuda is None and cuda_buildable() is None):
        res["cuda"] = _ensure("cuda")["loaded"]
    return res


def _flavour(device) -> str:
    return "cuda" if torch.device(device).type == "cuda" else torch.device(device).type


def unavailable_reason(device: Union[str, torch.device] = "cpu") -> Optional[str]:
    """None if the kernel can run on `device` (building lazily), else why not."""
    fl = _flavour(device)
    if fl not in ("cpu", "cuda"):
        return f"no mean-field kernel for device type {fl!r}"
    st = _ensure("cpu")
    if not st["loaded"]:
        return st["error"]
    if fl == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        st = _ensure("cuda")
        if not st["loaded"]:
            return st["error"]
    return None


def available(device: Union[str, torch.device] = "cpu") -> bool:
    """True if torch.ops.mal.mean_field runs on `device` (lazy build, cached)."""
    return unavailable_reason(device) is None


def status() -> Dict[str, dict]:
    """What was tried in this process: flavour -> loaded/error/build_s/cached/path."""
    with _lock:
        return {k: dict(v) for k, v in _state.items()}


def mean_field(image: torch.Tensor, prob: torch.Tensor,
               box_mask: Optional[torch.Tensor] = None, *, iters: int,
               zeta: float = 0.5, omega: float = 2.0) -> torch.Tensor:
    """Run the fused kernel (no autograd); returns float32 Q [B,H,W].

    Raises RuntimeError if the kernel is not available for the device."""
    why = unavailable_reason(image.device)
    if why is not None:
        raise RuntimeError(f"crf_ext kernel unavailable on {image.device}: {why}")
    with torch.no_grad():
        return torch.ops.mal.mean_field(image, prob, box_mask, int(iters),
                                        float(zeta), float(omega))


def cuda_emu(nobarrier: bool = False):
    """The CUDA kernels on the CPU (tests only): builds the cuda_emu flavour and returns its
    ``torch.ops`` namespace (``mean_field``, ``launches``).  The launcher answers device
    attributes as an H100's or an A100's (env ``MAL_CRF_EMU_GPU=h100|a100``) and honours
    ``MAL_CRF_CUDA_PATH`` as on a GPU.  nobarrier: a variant whose ``__syncthreads()`` does
    nothing (it must give wrong results).  Raises RuntimeError if the build fails."""
    flavour = "cuda_emu_nobarrier" if nobarrier else "cuda_emu"
    st = _ensure(flavour)
    if not st["loaded"]:
        raise RuntimeError(st["error"])
    return getattr(torch.ops, "mal_" + flavour)


# torch.compile / FakeTensor support (needs the schema: registered right after
# the CPU module loads).
_fake_registered = False


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    def _fake(image, prob, box_mask, iters, zeta=0.5, omega=2.0):
        torch._check(image.dim() == 4, lambda: "mal::mean_field: image must be [B,C,H,W]")
        torch._check(prob.dim() == 3, lambda: "mal::mean_field: prob must be [B,H,W]")
        B, _, H, W = image.shape
        return image.new_empty((B, H, W), dtype=torch.float32)

    torch.library.register_fake("mal::mean_field")(_fake)
    _fake_registered = True
