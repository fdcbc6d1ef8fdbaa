"""How crf_ext's kernels are built: the CUDA toolkit found (through wrapper scripts), the compiler
flags, and a just-in-time ninja build per flavour into a cache folder keyed by a hash of the
sources, the flags and the torch version, so that later runs load the library in milliseconds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch

_HERE = Path(__file__).resolve().parent
_CPU_SOURCES = ["mean_field_cpu.cpp"]
_CUDA_SOURCES = ["mean_field_cuda.cu"]
_HEADERS = ["mean_field.h", "op_common.h"]
_EMU_SOURCES = ["cuda_emu.cpp"]
_EMU_INCLUDES = ["mean_field_cuda.cu", "cuda_emu.h"]  # besides _HEADERS
_DEFAULT_CUDA_ARCHS = "8.0;9.0"


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


def build(flavour: str, force: bool = False) -> dict:
    """Build (or load from the cache) one flavour's library into this process; never raises. Returns
    {"loaded", "error", "build_s", "cached", "path"}. The CUDA flavour needs the CPU one loaded first
    (it holds the op's schema)."""
    st = {"loaded": False, "error": None, "build_s": None, "cached": False,
          "path": None}
    t0 = None  # set when a real compile starts (a cached load is silent)
    try:
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


