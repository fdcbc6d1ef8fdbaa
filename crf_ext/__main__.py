"""python -m crf_ext --check [--rebuild]

Builds every flavour this machine can build (CPU always; CUDA wherever nvcc
and a CUDA build of torch exist, GPU or not), prints what was built and how
long it took, runs a small random problem on every device that can run it and
compares with a float64 reference (and with mal.mean_field when importable).
Exit status 1 if a build that should work failed or a result is off."""
import argparse
import sys
import time

import torch

import crf_ext
import mal  # the reference: python -m crf_ext runs from the project root


def _problem(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 3, 3, 37, 53
    # smooth image (so the pairwise weights are not all ~0) + noise
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + c) * torch.cos(2 * yy - c) for c in range(C)])
    img = img.expand(B, C, H, W) + 0.1 * torch.randn(B, C, H, W, generator=g)
    prob = torch.sigmoid(4 * (0.5 - (xx ** 2 + yy ** 2)) + torch.randn(B, H, W, generator=g))
    box = torch.rand(B, H, W, generator=g) > 0.2
    return img.to(device), prob.to(device), box.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m crf_ext")
    ap.add_argument("--check", action="store_true", help="build, run and compare")
    ap.add_argument("--rebuild", action="store_true", help="ignore the build cache")
    args = ap.parse_args(argv)
    if not args.check:
        ap.print_help()
        return 0
    ok = True
    flavours = ["cpu"]
    why_not_cuda = crf_ext.cuda_buildable()
    if why_not_cuda is None:
        flavours.append("cuda")
    else:
        print(f"cuda: not buildable here ({why_not_cuda}) -- skipped")
    for fl in flavours:
        t0 = time.perf_counter()
        st = crf_ext._ensure(fl, force=args.rebuild)
        if st["loaded"]:
            how = "cached" if st["cached"] else f"built in {st['build_s']:.1f}s"
            print(f"{fl}: OK ({how}, {time.perf_counter() - t0:.1f}s) {st['path']}")
        else:
            ok = False
            print(f"{fl}: BUILD FAILED: {st['error']}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        why = crf_ext.unavailable_reason(dev)
        if why is not None:
            print(f"run on {dev}: unavailable ({why})")
            ok = ok and dev != "cpu"  # a failed CUDA build is already counted
            continue
        for iters in (0, 1, 10, 30):
            img, prob, box = _problem(dev)
            t0 = time.perf_counter()
            q = crf_ext.mean_field(img, prob, box, iters=iters)
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            r64 = mal.mean_field(img.cpu(), prob.cpu(), box.cpu(), iters=iters, dtype=torch.float64)
            err = (q.cpu().double() - r64).abs().max().item()
            line = f"run on {dev}: iters={iters:3d} {dt * 1e3:7.2f} ms  max|kernel-float64|={err:.2e}"
            r32 = mal.mean_field(img.cpu(), prob.cpu(), box.cpu(), iters=iters)
            e32 = (q.cpu() - r32).abs().max().item()
            line += f"  max|kernel-mal.mean_field|={e32:.2e}"
            good = err <= 1e-5 and e32 <= 1e-5
            print(line + ("" if good else "  <-- FAIL (tolerance 1e-5)"))
            ok = ok and good
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
