"""One process of the two-process data-parallel checks (launched by torchrun from test_distributed).

Writes ``rank<R>.pt`` into the folder given as the first argument; the test compares the files.
"""

import copy
import os
import sys

import torch

import liftplus_fast as lf
from liftplus_fast import distributed as D
from liftplus_fast.config import make_config
from liftplus_fast.data import build_dataset, build_test_transform
from liftplus_fast.model import build_lift_model, load_clip

K = 10


def tiny_model(seed: int):
    torch.manual_seed(seed)
    clip, tok = load_clip("tiny_vit")
    cfg = make_config("lift+", {"num_classes": K, "resolution": 32, "classifier_init": "random"})
    counts = [100, 60, 40, 25, 15, 10, 6, 4, 2, 1]
    model = build_lift_model(clip, cfg, counts, [str(i) for i in range(K)], tokenizer=tok)
    # Non-zero adapters, so the adapter gradients are not trivially zero.
    with torch.no_grad():
        for name, p in model.tuner.named_parameters():
            if "up" in name:
                p.normal_(0, 0.05)
    return model, counts


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = D.init_distributed(torch.device("cpu"))
    assert ctx.world_size == 2, ctx
    result = {"rank": ctx.rank}

    # 1. Gradient averaging: the two halves of a batch give the full batch's gradient.
    model, counts = tiny_model(seed=0)
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    labels = torch.randint(0, K, (8,), generator=gen)
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    full = copy.deepcopy(model)
    full.training_loss(images, labels)[0].backward()
    model.training_loss(images[ctx.rank :: 2], labels[ctx.rank :: 2])[0].backward()
    ctx.average_gradients(params)
    full_params = [p for p in full.tuner.parameters() if p.requires_grad]
    result["grad_err"] = max(float((p.grad - q.grad).abs().max()) for p, q in zip(params, full_params))
    result["grad_norm"] = float(sum(q.grad.norm() for q in full_params))

    # 2. Broadcast: rank 1's perturbed tuner becomes rank 0's.
    other, _ = tiny_model(seed=ctx.rank + 7)
    ctx.broadcast_module(other.tuner)
    result["broadcast_tuner"] = {k: v.clone() for k, v in other.tuner.state_dict().items()}

    # 3. Sharded evaluation sums to the whole test set's metrics.
    tte_cfg = make_config("lift+", {"num_classes": K, "resolution": 32, "tte": True, "expand": 8})
    test_set = build_dataset("digits_lt", "./data", "test", build_test_transform(tte_cfg))
    loader = torch.utils.data.DataLoader(ctx.shard(test_set), batch_size=32)
    result["eval_sharded"] = lf.evaluate(model, loader, counts, progress=False, distributed=True)
    whole = torch.utils.data.DataLoader(test_set, batch_size=32)
    result["eval_whole"] = lf.evaluate(model, whole, counts, progress=False)

    # 4. fast_train inside the caller's group: same tuner and metrics on both processes.
    run = lf.fast_train(
        dataset="digits_lt",
        backbone="tiny_vit",
        pretrained=None,
        resolution=32,
        batch_size=32,
        num_epochs=1,
        num_workers=0,
        prec_train="fp32",
        prec_test="fp32",
        progress=False,
    )
    result["train_tuner"] = {k: v.detach().clone() for k, v in run.tuner.state_dict().items()}
    result["train_metrics"] = run.metrics
    result["train_images"] = run.history[0]["images"]
    result["group_alive"] = torch.distributed.is_initialized()

    # 5. One implementation of each op for every process: rank 0's, whatever each measured.
    from liftplus_fast.ops import choices

    own = "native" if ctx.rank else "fp32"
    choices.adopt({"half_gemm": {"option": own, "why": f"rank {ctx.rank}"}})
    ctx.agree_on_choices()
    result["choices"] = choices.table()

    torch.save(result, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    D.shutdown_distributed(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
