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

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Union

import torch

__all__ = ["load", "mean_field", "available", "status", "unavailable_reason",
           "find_cuda_home", "cuda_buildable", "cuda_emu"]

log = logging.getLogger("crf_ext")

_HERE = Path(__file__).resolve().parent
_CPU_SOURCES = ["mean_field_cpu.cpp"]
_CUDA_SOURCES = ["mean_field_cuda.cu"]
_HEADERS = ["mean_field.h", "op_common.h"]
_EMU_SOURCES = ["cuda_emu.cpp"]
_EMU_INCLUDES = ["mean_field_cuda.cu", "cuda_emu.h"]  # besides _HEADERS
_DEFAULT_CUDA_ARCHS = "8.0;9.0"

_lock = threading.RLock()
# flavour -> {"loaded": bool, "error": str|None, "build_s": float|None,
#             "cached": bool, "path": str|None}
_state: Dict[str, dict] = {}


# --------------------------------------------------------------------------
# CUDA toolkit discovery
# --------------------------------------------------------------------------
def _is_toolkit(home: Optional[Union[str, Path]]) -> bool:
    if not home:
        return False
    h = Path(home)
    nvcc = h / "bin" / "nvcc"
    return (nvcc.is_file() and (h / "include" / "cuda_runtime.h").is_file()
            and not _is_script(nvcc))


def _is_script(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _home_from_nvcc(nvcc: str) -> Optional[Path]:
    """Toolkit folder of an nvcc: follows symlinks and wrapper scripts."""
    p = Path(nvcc).resolve()
    if _is_toolkit(p.parent.parent):
        return p.parent.parent
    if _is_script(p):  # e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        try:
            text = p.read_text(errors="replace")[:10000]
        except OSError:
            text = ""
        for m in re.finditer(r"(/[^\s\"'$;|&]*/bin/nvcc)\b", text):
            cand = Path(m.group(1)).resolve()
            if cand != p and _is_toolkit(cand.parent.parent):
                return cand.parent.parent
    return None


def find_cuda_home() -> Optional[str]:
    """The real CUDA toolkit folder (with bin/nvcc and include/), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return str(Path(os.environ[var]).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        h = _home_from_nvcc(nvcc)
        if h:
            return str(h)
    cands = [Path("/usr/local/cuda")]
    if torch.version.cuda:
        cands.append(Path(f"/usr/local/cuda-{torch.version.cuda}"))
    cands += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    cands += [Path("/opt/cuda"), Path("/usr/lib/cuda")]
    for c in cands:
        if _is_toolkit(c):
            return str(c.resolve())
    if nvcc:  # last resort: ask the compiler where it lives
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True,
                                 text=True, timeout=30)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m and _is_toolkit(m.group(1).strip("\"'")):
                return str(Path(m.group(1).strip("\"'")).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def cuda_buildable() -> Optional[str]:
    """None if the CUDA flavour can be built here, else the reason."""
    if not torch.version.cuda:
        return "torch is not a CUDA build (torch.version.cuda is None)"
    if find_cuda_home() is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("MAL_CRF_CACHE",
                               Path.home() / ".cache" / "mal_crf_ext"))


def _cpu_flags():
    # -fno-trapping-math lets GCC if-convert (and vectorise) the clamps; it
    # does not change any result.  No -ffast-math.
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        cap = "DEFAULT"
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if cap == "AVX512":  # 16-wide vectors: -40% where the CPU has them (BENCHMARKS.md)
        flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq",
                  "-mprefer-vector-width=512"]
    return flags


def _cuda_arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # pragma: no cover
        pass
    return _DEFAULT_CUDA_ARCHS


def _build_spec(flavour: str) -> dict:
    if flavour == "cpu":
        spec = dict(name="mal_crf_cpu", sources=_CPU_SOURCES,
                    extra_cflags=_cpu_flags(), extra_ldflags=["-fopenmp"])
    elif flavour in ("cuda_emu", "cuda_emu_nobarrier"):
        # -O1: the fibers' switches, not the code, set the emulator's speed.
        spec = dict(name=f"mal_crf_{flavour}", sources=_EMU_SOURCES, includes=_EMU_INCLUDES,
                    extra_cflags=["-O1"]
                    + (["-DMAL_CRF_EMU_NO_BARRIER"] if flavour == "cuda_emu_nobarrier" else []))
    else:
        spec = dict(name="mal_crf_cuda", sources=_CUDA_SOURCES,
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo", "--fmad=true",
                                       "-prec-div=true", "-prec-sqrt=true"],
                    archs=_cuda_arch_list(), cuda_home=find_cuda_home())
    h = hashlib.sha256()
    for f in spec["sources"] + _HEADERS + spec.get("includes", []):
        h.update(f.encode())
        h.update((_HERE / f).read_bytes())
    key = {k: v for k, v in spec.items() if k not in ("sources", "includes")}
    h.update(repr(sorted(key.items())).encode())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    spec["dir"] = _cache_root() / f"{flavour}-{h.hexdigest()[:16]}"
    return spec


@contextmanager
def _quiet_cpp_extension(cuda_home: Optional[str], archs: Optional[str]):
    """Import cpp_extension with the right CUDA_HOME and without its noise."""
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    lg = logging.getLogger("torch.utils.cpp_extension")
    old_level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_ext
        if cuda_home:
            cpp_ext.CUDA_HOME = cuda_home  # computed (wrongly) at import time
        yield cpp_ext
    finally:
        lg.setLevel(old_level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(msg: str, n: int = 1500) -> str:
    msg = msg.strip()
    return msg if len(msg) <= n else "..." + msg[-n:]


def _build(flavour: str, force: bool = False) -> dict:
    st = {"loaded": False, "error": None, "build_s": None, "cached": False,
          "path": None}
    t0 = None  # set when a real compile starts (a cached load is silent)
    try:
        if flavour == "cuda":
            why = cuda_buildable()
            if why:
                st["error"] = why
                return st
            load_cpu = _ensure("cpu")
            if not load_cpu["loaded"]:
                st["error"] = "CPU module (schema) failed: " + str(load_cpu["error"])
                return st
        spec = _build_spec(flavour)
        bdir: Path = spec["dir"]
        so = bdir / f"{spec['name']}.so"
        stamp = bdir / "ok"
        st["path"] = str(so)
        if not force and so.is_file() and stamp.is_file():
            torch.ops.load_library(str(so))
            st.update(loaded=True, cached=True)
            return st
        bdir.mkdir(parents=True, exist_ok=True)
        if stamp.exists():
            stamp.unlink()
        # A first build takes 10-30 s (CPU) or minutes (CUDA): say so, or it looks like a hang.
        print(f"crf_ext: building the {flavour} mean-field kernel in {bdir} (once; later runs load it)",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with _quiet_cpp_extension(spec.get("cuda_home"), spec.get("archs")) as cpp_ext:
            kw = dict(name=spec["name"],
                      sources=[str(_HERE / s) for s in spec["sources"]],
                      extra_cflags=spec["extra_cflags"],
                      extra_ldflags=spec.get("extra_ldflags"),
                      extra_include_paths=[str(_HERE)],
                      build_directory=str(bdir), verbose=False,
                      is_python_module=False, with_cuda=(flavour == "cuda"))
            if flavour == "cuda":
                kw["extra_cuda_cflags"] = spec["extra_cuda_cflags"]
            if force:
                for f in bdir.glob("*.o"):
                    f.unlink()
                if so.exists():
                    so.unlink()
            cpp_ext.load(**kw)
        st["build_s"] = time.perf_counter() - t0
        stamp.write_text(f"built in {st['build_s']:.1f}s\n")
        st["loaded"] = True
        print(f"crf_ext: built the {flavour} kernel in {st['build_s']:.1f} s", file=sys.stderr, flush=True)
    except Exception as e:  # never raise from loading
        st["error"] = f"{flavour} build/load failed: {type(e).__name__}: {_short(str(e))}"
        if t0 is not None:
            print(f"crf_ext: the {flavour} kernel build failed after {time.perf_counter() - t0:.1f} s "
                  f"(crf_ext.status() has the error)", file=sys.stderr, flush=True)
    return st


def _ensure(flavour: str, force: bool = False) -> dict:
    with _lock:
        if flavour not in _state or (force and not _state[flavour]["loaded"]):
            st = _build(flavour, force=force)
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
