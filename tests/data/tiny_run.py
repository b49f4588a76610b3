"""Settings of the small runs the tests share (tiny random ViT, 32 px), for ``fast_train`` and for
the command line."""

TINY = dict(
    backbone="tiny_vit",
    pretrained=None,
    resolution=32,
    batch_size=8,
    num_epochs=1,
    num_workers=0,
    progress=False,
    output_dir=None,
)

# fp32 training and evaluation: runs that must agree exactly (resumed, distributed, stopped) say so.
FP32 = dict(prec_train="fp32", prec_test="fp32")


def tiny_run(**overrides):
    """``TINY`` with ``overrides`` applied: keyword arguments for one ``fast_train`` call."""
    return {**TINY, **overrides}


def tiny_argv(out, *flags, command="train", dataset="digits_lt", root=None, method=None, **options):
    """The ``liftplus-fast`` arguments of a tiny run writing into ``out``.

    ``flags`` (``--resume``, ``--overwrite``) come before the ``key value`` options: ``TINY``'s
    epochs, resolution and workers, with ``options`` added or overriding them.
    """
    argv = [command, "-d", dataset, "-b", TINY["backbone"], "--pretrained", "none"]
    argv += ["--root", str(root)] if root is not None else []
    argv += ["-m", method] if method is not None else []
    argv += ["--output-dir", str(out), "--no-progress", *flags]
    for key, value in {**{k: TINY[k] for k in ("num_epochs", "resolution", "num_workers")}, **options}.items():
        argv += [key, str(value)]
    return argv
