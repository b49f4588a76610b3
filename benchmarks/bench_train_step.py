"""End-to-end LIFT+ training step (forward, loss, backward, SGD step) on a ViT.

Candidates, interleaved in one process on models with the same weights and tuner:

* ``reference_fp32``: every op on the pure-PyTorch reference path (the published code's
  structure: SDPA attention, QuickGELU as three ops, eager AdaptFormer and loss, per-tensor SGD)
  in fp32;
* ``reference``: the same under bf16 autocast (what the published code's one autocast line
  gives on CPU; autocast re-casts every frozen weight at every step);
* ``compile``: ``torch.compile`` of that bf16 reference loss;
* ``fast_fp32`` / ``fast_bf16``: the package's default path with the precision owned by the
  model (``prec_train="fp32"`` / ``"bf16"``; the default ``"amp"`` is bf16 on CPU, the same
  path): frozen weights stored once in bf16, the fused attention, bias+GELU, AdaptFormer and
  loss kernels, one multi-tensor SGD update.

Full mode: CLIP ViT-B/16 at 224 px, B = 32, K = 100 and K = 1000 (random weights: they do not
change the cost). ``--quick``: B = 8, K = 100 (under ~3 minutes on 2 cores). Smoke mode (CI,
through ``run.py``): a tiny ViT. The flops column counts the GEMMs of the step, so the measured
GEMM rate gives the compute floor; ``--profile`` prints where the fast bf16 step spends its
time. Run standalone: ``python benchmarks/bench_train_step.py [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import backend  # noqa: E402

from liftplus_fast.files import atomic_write_json  # noqa: E402
from liftplus_fast.ops import choices  # noqa: E402
from liftplus_fast.ops.gemm import cpu_bf16_gemm_path, cpu_has_bf16_units  # noqa: E402
from liftplus_fast.train_loop import TrainStep, make_optimizer  # noqa: E402

NAME = "train_step"
BF16 = ("reference", "compile", "fast_bf16")


def _step_fn(model, images, labels, backend_name, autocast, compile_loss=False, fast_optim=False):
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    cfg = model.cfg
    if fast_optim:
        # The package's own step, as fast_train runs it.
        train_step = TrainStep(model, make_optimizer(params, cfg))

        def fast_step():
            with backend(backend_name):
                train_step(images, labels)

        return fast_step
    optim = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def loss_fn(x, y):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            return model.training_loss(x, y)[0]

    if compile_loss:
        with backend(backend_name):
            loss_fn = common.compiled(loss_fn)

    def step():
        with backend(backend_name):
            loss = loss_fn(images, labels)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

    return step


def _vit_gemm_flops(width, layers, tokens, batch, r, k):
    # Per block: qkv (3), attention out (1), MLP (8) width² GEMMs per token, plus attention
    # scores/values (2·tokens·width); the backward computes only input gradients of the
    # frozen weights (×2 in total), the adapter is small. Classifier: B·K·width, three times.
    per_token = 2 * (12 * width * width + 2 * tokens * width)
    frozen = layers * batch * tokens * per_token * 2
    adapter = layers * batch * tokens * 2 * 2 * width * r * 3
    return frozen + adapter + 3 * 2 * batch * k * width


CANDIDATES = ("reference_fp32", "reference", "compile", "fast_fp32", "fast_bf16")


def make_case(name, size, batch, k, only=CANDIDATES):
    clip, models = common.lift_models(name, size, k, {c: "bf16" if c == "fast_bf16" else "fp32" for c in CANDIDATES})
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, k, (batch,), generator=g)
    make = {
        "reference_fp32": lambda: _step_fn(models["reference_fp32"], images, labels, "reference", False),
        "reference": lambda: _step_fn(models["reference"], images, labels, "reference", True),
        "compile": lambda: _step_fn(models["compile"], images, labels, "reference", True, compile_loss=True),
        "fast_fp32": lambda: _step_fn(models["fast_fp32"], images, labels, "auto", False, fast_optim=True),
        "fast_bf16": lambda: _step_fn(models["fast_bf16"], images, labels, "auto", False, fast_optim=True),
    }
    candidates = {n: make[n]() for n in only}
    v = clip.visual
    width, layers = v.conv1.weight.shape[0], len(v.transformer.resblocks)
    tokens = (size // v.conv1.weight.shape[-1]) ** 2 + 1
    r = models["fast_bf16"].image_encoder.blocks[0].tuner.adaptformer.down.weight.shape[0]
    case = common.Case(
        f"{name} B={batch} K={k} step",
        {"backbone": name, "B": batch, "K": k},
        candidates,
        flops=_vit_gemm_flops(width, layers, tokens, batch, r, k),
    )
    case.notes.append(
        "reference/compile/fast_bf16 are bf16 (reference = bf16 autocast); "
        "fast_bf16 is also the default prec_train=amp on CPU"
    )
    return case, models, images, labels


def cases(smoke: bool):
    shape = ("tiny_vit", 32, 4, 10) if smoke else ("ViT-B-16", 224, 8, 100)
    yield make_case(*shape)[0]


# --- standalone run -----------------------------------------------------------------------------


def _category(name: str) -> str:
    n = name.lower()
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"):
        return "GEMMs (mm/addmm/bmm, packed linear)"
    if "attention" in n:
        return "attention (fused kernel fwd+bwd)" if "liftplus_fast" in n else "SDPA attention"
    if "bias_gelu" in n:
        return "bias + QuickGELU (fused fwd+bwd)"
    if "adaptformer" in n:
        return "AdaptFormer (fused fwd+bwd)"
    if "la_cosine" in n:
        return "LA cosine CE (fused)"
    if "layer_norm" in n:
        return "LayerNorm (fp32) fwd+bwd"
    if "copy" in n or "to_copy" in n or "clone" in n or "contiguous" in n:
        return "copies / casts"
    if "convolution" in n or "conv" in n:
        return "patch embedding conv"
    if "sgd" in n or "foreach" in n:
        return "optimiser"
    if n in ("aten::mul", "aten::sigmoid", "aten::sigmoid_backward", "aten::gelu", "aten::gelu_backward"):
        return "QuickGELU (mul/sigmoid, eager)"
    if n in ("aten::add", "aten::add_", "aten::sum", "aten::fill_", "aten::zero_", "aten::empty"):
        return "element-wise add / sum / fill"
    return "other"


def profile_table(step, steps: int = 2):
    """Self-CPU-time share of each category of op over ``steps`` steps (one warm-up first)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with common._quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    shares, total = {}, 0.0
    calls = {}
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        cat = _category(ev.key)
        shares[cat] = shares.get(cat, 0.0) + t
        calls[cat] = calls.get(cat, 0) + ev.count
    rows = sorted(shares.items(), key=lambda kv: -kv[1])
    return [(cat, 100.0 * t / total, t / 1e3 / steps, calls[cat] // steps) for cat, t in rows], total / 1e3 / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 8, K = 100 only (a few minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny ViT (seconds)")
    parser.add_argument(
        "--case",
        action="append",
        metavar="B,K",
        help="ViT-B/16 cases to run instead (batch B, K classes), e.g. --case 8,100 --case 32,100",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="profile table of the fast bf16 step")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--slow-bf16-batch",
        type=int,
        default=2,
        help="batch of the bf16 reference case on CPUs without bf16 GEMM units (default 2)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step_standalone.json"),
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case:
        try:
            shapes = [("ViT-B-16", 224, *(int(v) for v in c.split(","))) for c in args.case]
        except ValueError:
            parser.error(f"--case takes B,K (two integers); got {args.case}")
        if any(len(sh) != 4 for sh in shapes):
            parser.error(f"--case takes B,K (two integers); got {args.case}")
    elif args.smoke:
        shapes = [("tiny_vit", 32, 4, 10)]
    elif args.quick:
        shapes = [("ViT-B-16", 224, 8, 100)]
    else:
        shapes = [("ViT-B-16", 224, 32, 100), ("ViT-B-16", 224, 32, 1000)]
    repeats = args.repeats or 3
    # Two questions: whether PyTorch's bf16 GEMMs (the bf16 reference candidates) run on bf16
    # units at all, and which path the package's fast_bf16 takes (measured, see ops/gemm.py).
    bf16_units = cpu_has_bf16_units()
    fast_path = cpu_bf16_gemm_path()
    gemm = {"fp32": common.gemm_throughput("cpu", torch.float32), "bf16": common.gemm_throughput("cpu", torch.bfloat16)}
    print(
        f"measured GEMM rate: fp32 {gemm['fp32'] / 1e9:.0f} GFLOP/s, bf16 {gemm['bf16'] / 1e9:.0f} GFLOP/s "
        f"({args.threads} threads; bf16 units: {'yes' if bf16_units else 'no'}); "
        f"fast_bf16 GEMMs: {fast_path['path']} ({fast_path['why']})"
    )
    native_bf16 = fast_path["path"] == "native"
    # What the fast candidates run on this machine (each op's measured choice, ops/choices.py).
    decided = choices.table()
    for name, d in decided.items():
        print(f"  {name}: {d['option']} ({d['why']})")
    if not bf16_units:
        # The bf16 reference candidates run PyTorch's bf16 GEMMs, which this CPU emulates ~30x
        # slower than fp32 (a ViT-B/16 step at B = 32 would take ~20 min): they are measured in
        # their own case at a small batch, interleaved with fast_bf16 at that batch.
        shapes = [(*sh[:2], sh[2], sh[3], ("reference_fp32", "fast_fp32", "fast_bf16")) for sh in shapes]
        shapes.append((shapes[0][0], shapes[0][1], args.slow_bf16_batch, shapes[0][3], BF16))
    results = []
    for shape in shapes:
        case, models, images, labels = make_case(*shape)
        slow = not bf16_units and "reference" in case.candidates  # minutes per step: one repeat
        times = common.time_interleaved(case.candidates, repeats=1 if slow else repeats, warmup=1)
        med = {n: common.median(t) for n, t in times.items()}
        mem = {} if args.no_memory else {n: common.peak_memory_bytes(fn) for n, fn in case.candidates.items()}
        batch = shape[2]
        print(f"\n## {case.name} ({1 if slow else repeats} interleaved repeats, median)")
        print(f"{'candidate':16s} {'s/step':>8s} {'img/s':>7s} {'peak MB':>8s} {'GEMM floor':>10s}")
        row = {
            "case": case.name,
            "fast_bf16_gemms": fast_path,
            "choices": decided,
            "s": med,
            "images_per_s": {n: batch / t for n, t in med.items()},
            "peak_mb": {n: m / 2**20 for n, m in mem.items()},
            "gemm_floor_fraction": {},
        }
        for n, t in med.items():
            rate = gemm["bf16"] if n in BF16 and (native_bf16 or n != "fast_bf16") else gemm["fp32"]
            floor = case.flops / rate / t
            row["gemm_floor_fraction"][n] = floor
            pm = f"{mem[n] / 2**20:8.0f}" if n in mem else f"{'-':>8s}"
            print(f"{n:16s} {t:8.3f} {batch / t:7.2f} {pm} {floor:10.2f}")
        pairs = {
            "fast_bf16 / reference (bf16 autocast)": ("reference", "fast_bf16"),
            "fast_bf16 / compile (bf16)": ("compile", "fast_bf16"),
            "fast_fp32 / reference_fp32": ("reference_fp32", "fast_fp32"),
            "fast_bf16 (= amp) / reference_fp32": ("reference_fp32", "fast_bf16"),
        }
        ratios = {label: med[a] / med[b] for label, (a, b) in pairs.items() if a in med and b in med}
        for label, (a, b) in (
            ("peak memory fast_bf16 / reference", ("reference", "fast_bf16")),
            ("peak memory fast_fp32 / reference_fp32", ("reference_fp32", "fast_fp32")),
        ):
            if a in mem and b in mem:
                ratios[label] = mem[b] / max(1, mem[a])
        for label, value in ratios.items():
            print(f"  {label}: {value:.2f}")
        row["ratios"] = ratios
        if args.profile:
            # On CPUs without bf16 units fast_bf16 runs fp32 GEMMs of bf16 values: its profile
            # then shows what the bf16 activations cost around them.
            for n in [c for c in ("fast_bf16", "fast_fp32", "reference_fp32") if c in case.candidates]:
                if n == "fast_bf16" and case.candidates.get("reference") is not None and not bf16_units:
                    continue  # the small-batch bf16 case: its fast_bf16 profile adds nothing
                table, total_ms = profile_table(case.candidates[n])
                print(f"\nprofile of {n} ({total_ms:.0f} ms of op self time per step)")
                print("| op | share | ms/step | calls/step |\n| --- | --- | --- | --- |")
                for cat, share, ms, calls in table:
                    print(f"| {cat} | {share:.1f} % | {ms:.0f} | {calls} |")
                row[f"profile_{n}"] = table
        results.append(row)
        del case, models
    atomic_write_json(args.out, {"gemm_flops_per_s": gemm, "threads": args.threads, "rows": results}, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
