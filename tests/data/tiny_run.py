"""Settings of the small ``fast_train`` runs the data tests share (tiny random ViT, 32 px)."""

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


def tiny_run(**overrides):
    """``TINY`` with ``overrides`` applied: keyword arguments for one ``fast_train`` call."""
    return {**TINY, **overrides}
