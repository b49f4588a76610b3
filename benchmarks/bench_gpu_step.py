"""LIFT+ training step on a GPU: the published step structure against this package's step.

Candidates, on models with the same weights and tuner (random CLIP weights: they do not change
the cost), each one whole step (forward, LA loss, backward, SGD with momentum and weight decay):

* ``published_autocast``: the published structure (every op on the pure-PyTorch reference path:
  SDPA attention, QuickGELU as three ops, eager AdaptFormer and loss) with an fp32 model under
  ``torch.autocast(bf16)``, as the published code's one autocast line gives;
* ``published_compile``: ``torch.compile`` of that loss (static shapes);
* ``fast_amp``: the package's default ``prec_train="amp"`` (fp16 on CUDA with the gradient
  scaler, frozen weights stored once in fp16, fused AdaptFormer and loss kernels);
* ``fast_bf16``: ``prec_train="bf16"`` (no scaler).

Full size: CLIP ViT-B/16 at 224 px, B = 128, K = 1000. Candidates are warmed up one by one (the
compiled one last: its compilation is the longest part), then timed in interleaved rounds with
CUDA events; the JSON is rewritten after every warm-up and round, so a run stopped by a time
limit keeps what it measured. ``--cpu`` runs the same candidates on a tiny ViT on the CPU
(bf16 autocast there; ``amp`` is bf16 on CPUs), to rehearse the GPU run.

    python benchmarks/bench_gpu_step.py --out results/gpu_step.json [--repeats 5] [--cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "gpu_step"
CANDIDATES = ("published_autocast", "fast_amp", "fast_bf16", "published_compile")
PRECISION = {"published_autocast": "fp32", "fast_amp": "amp", "fast_bf16": "bf16", "published_compile": "fp32"}


def make_step(cand: str, model, images, labels):
    """One training step of ``cand`` (returns the loss tensor, not synchronised)."""
    cfg = model.cfg
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    published = cand.startswith("published")
    name = "reference" if published else "auto"
    dev = images.device.type

    def loss_fn(x, y):
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if published else contextlib.nullcontext()
        with ctx:
            return model.training_loss(x, y)[0]

    if cand == "published_compile":
        with common.backend(name):
            loss_fn = common.compiled(loss_fn)
    scaler = torch.amp.GradScaler(dev) if model.needs_grad_scaler else None

    def step():
        with common.backend(name):
            loss = loss_fn(images, labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
            else:
                loss.backward()
                optim.step()
            optim.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _timed(step, device: str) -> tuple[float, float]:
    """Seconds of one step (CUDA events on a GPU) and its loss."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, float(loss)
    t0 = time.perf_counter()
    loss = step()
    return time.perf_counter() - t0, float(loss)


def run(out: str, device: str, backbone: str, size: int, batch: int, k: int, repeats: int, only=CANDIDATES) -> dict:
    models = common.lift_models(backbone, size, k, PRECISION, device)[1]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, k, (batch,), generator=g).to(device)
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "backbone": backbone,
        "B": batch,
        "K": k,
        "resolution": size,
        "r": models["fast_amp"].image_encoder.blocks[0].tuner.adaptformer.down.weight.shape[0],
        "compute_dtype": {c: str(m.compute_dtype) for c, m in models.items()},
        "warmup_s": {},
        "first_loss": {},
        "step_s": {},
        "peak_mem_mb": {},
    }
    steps = {c: make_step(c, models[c], images, labels) for c in only}
    for cand, step in steps.items():  # warm-up: compilation, autotuning, allocator
        t0 = time.perf_counter()
        result["first_loss"][cand] = _timed(step, device)[1]
        _timed(step, device)
        result["warmup_s"][cand] = time.perf_counter() - t0
        result["peak_mem_mb"][cand] = common.peak_memory_bytes(step, device) / 2**20
        result["step_s"][cand] = []
        common.write_json(out, summarize(result))
        print(f"  {cand}: warm after {result['warmup_s'][cand]:.1f}s", flush=True)
    names = list(steps)
    for rep in range(repeats):
        shift = rep % len(names)
        for cand in names[shift:] + names[:shift]:
            result["step_s"][cand].append(_timed(steps[cand], device)[0])
        common.write_json(out, summarize(result))
    return summarize(result)


def summarize(result: dict) -> dict:
    """Medians, images/s and the ratios against the published structure."""
    out = dict(result)
    med = {c: statistics.median(t) for c, t in result["step_s"].items() if t}
    out["median_step_ms"] = {c: 1e3 * t for c, t in med.items()}
    out["images_per_s"] = {c: result["B"] / t for c, t in med.items()}
    ratios = {}
    for base in ("published_autocast", "published_compile"):
        if base in med:
            ratios[f"vs_{base}"] = {c: med[base] / t for c, t in med.items() if c != base}
    out["speedup"] = ratios
    return out


def markdown(summary: dict) -> str:
    """The result as a Markdown table (img/s, ms/step, peak memory above the resident models)."""
    lines = [
        f"{summary['backbone']}, B = {summary['B']}, K = {summary['K']}, r = {summary['r']}, "
        f"{summary['device']}, torch {summary['torch']}",
        "",
        "| step | img/s | ms/step | vs published (autocast) | vs published (compile) | peak MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in CANDIDATES:
        if c not in summary["median_step_ms"]:
            continue
        a = summary["speedup"].get("vs_published_autocast", {}).get(c)
        b = summary["speedup"].get("vs_published_compile", {}).get(c)
        mem = summary["peak_mem_mb"].get(c)
        lines.append(
            f"| {c} | {summary['images_per_s'][c]:.0f} | {summary['median_step_ms'][c]:.1f} | "
            f"{f'{a:.2f}x' if a else '-'} | {f'{b:.2f}x' if b else '-'} | {f'{mem:.0f}' if mem else '-'} |"
        )
    return "\n".join(lines) + "\n"


def cases(smoke: bool):
    """No cases for ``benchmarks/run.py``: this benchmark has its own main (see the module doc)."""
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file (rewritten after every warm-up and round)")
    parser.add_argument("--cpu", action="store_true", help="tiny ViT on the CPU (rehearsal)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    args = parser.parse_args(argv)
    if args.cpu:
        device, shape = "cpu", ("tiny_vit", 32, args.batch or 4, 10)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device (use --cpu to rehearse on the CPU)")
        device, shape = "cuda", ("ViT-B-16", 224, args.batch or 128, 1000)
    summary = run(args.out, device, *shape, repeats=args.repeats, only=tuple(args.only))
    table = markdown(summary)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
