"""The CLIP text head (no classifier) and the CLIP-side tuners of the published code.

Without a classifier the logits are CLIP's: ``exp(logit_scale) * cos(image @ P_img, text @ P_txt)``
over the class prompts. The published code can train, on that head:

* CoOp (``coop True``): learnable context token embeddings in the prompt, ``coop_ctx_len`` of
  them, the class name at ``coop_cls_pos`` (``front`` / ``middle`` / ``end``), initialised
  N(0, 0.02) or, with ``coop_init photo``, from the embeddings of ``"a photo of a {}."``;
* projection tuning (``proj_tuning True``): the image and text projections;
* CLIP-Adapter (``clip_adapter True``): a residual bottleneck Adapter of width
  ``clip_adapter_dim`` on each projected feature;
* the tuners of the text encoder's blocks (``l.*`` options: the same tuners as ``v.*``, with the
  published text defaults), the blocks run with causal attention.

The trained tensors carry the published tuner names: ``text_encoder.ctx``,
``text_encoder.blocks.{i}.<tuner>``, ``image_proj``, ``text_proj``, ``image_adapter.*``,
``text_adapter.*``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserInputError
from .inits import CLASS_PROMPT, default_tokenizer, text_parts
from .peft_vit import PEFTBlock
from .tuners import TUNERS, Adapter, fp32_layer_norm, install_tuners

__all__ = ["COOP_CLS_POSITIONS", "COOP_INITS", "TextHead", "coop_template"]

COOP_CLS_POSITIONS = ("front", "middle", "end")  # where the class name sits among the contexts
COOP_INITS = ("photo",)  # None: random contexts


def coop_template(ctx_len: int, cls_pos: str, init: Optional[str]) -> Tuple[str, List[int]]:
    """The prompt template and the context positions (relative to the text between the start
    and end tokens; negative counts from the end) of the published CoOp set-up."""
    if init == "photo":
        return CLASS_PROMPT, [0, 1, 2, 3, -1]  # "a photo of a" and the full stop
    if init is not None:
        raise UserInputError(f"coop_init must be None or one of {COOP_INITS}; got {init!r}")
    if cls_pos == "front":
        return "{}" + " X" * ctx_len + ".", list(range(-ctx_len - 1, -1))
    if cls_pos == "middle":
        left, right = ctx_len // 2, (ctx_len + 1) // 2
        return "X " * left + "{}" + " X" * right + ".", list(range(left)) + list(range(-right - 1, -1))
    if cls_pos == "end":
        return "X " * ctx_len + "{}.", list(range(ctx_len))
    raise UserInputError(f"coop_cls_pos must be one of {COOP_CLS_POSITIONS}; got {cls_pos!r}")


def _context_index(tokens: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    # Position of each context slot in each prompt: the text sits between the start token (0)
    # and the end token (the largest id), so relative position p is 1 + p mod (text length).
    eot = tokens.argmax(dim=-1, keepdim=True)
    return rel.view(1, -1) % (eot - 1) + 1


def _project(feats: torch.Tensor, proj) -> torch.Tensor:
    if proj is None:
        return feats
    if isinstance(proj, nn.Linear):
        return proj(feats.to(proj.weight.dtype))
    return feats.to(proj.dtype) @ proj


class TextHead(nn.Module):
    """CLIP's text head over the class prompts, with the CLIP-side tuners of ``cfg``.

    ``trained`` (a dict of name -> module/parameter) holds what is trained, under the published
    tuner names; :class:`~liftplus_fast.model.LiftModel` puts it into its ``tuner``.
    """

    def __init__(self, clip_model: nn.Module, cfg, classnames: Sequence[str], tokenizer=None):
        super().__init__()
        self.__dict__["clip"] = clip_model  # not a submodule: the model owns the backbone
        text = text_parts(clip_model)
        tokenizer = tokenizer or default_tokenizer(clip_model)
        self.trained: Dict[str, nn.Module] = {}
        self.coop = bool(cfg.coop)
        self.text_encoder = nn.Module()
        self.blocks = None
        if any(getattr(cfg.l, name) for name in TUNERS):
            resblocks = text.transformer.resblocks
            self.blocks = nn.ModuleList(PEFTBlock(b) for b in resblocks)
            for blk in self.blocks:
                blk.is_causal = True
            self.text_summary = install_tuners(self.blocks, cfg.l, len(classnames))
            self.text_encoder.blocks = nn.ModuleList(b.tuner for b in self.blocks)
            self.blocks.to(text.token_embedding.weight.device)
        if self.coop:
            template, rel = coop_template(int(cfg.coop_ctx_len), cfg.coop_cls_pos, cfg.coop_init)
        else:
            template, rel = CLASS_PROMPT, []
        device = text.token_embedding.weight.device
        prompts = [template.format(str(n).replace("_", " ")) for n in classnames]
        self.register_buffer("tokens", tokenizer(prompts).to(device), persistent=False)
        if self.coop:
            rel_t = torch.tensor(rel, dtype=torch.int64, device=device)
            self.register_buffer("ctx_index", _context_index(self.tokens, rel_t), persistent=False)
            width = text.token_embedding.weight.shape[1]
            ctx = nn.Parameter(torch.empty(len(rel), width, device=device))
            if cfg.coop_init is None:
                nn.init.normal_(ctx, std=0.02)
            else:
                # The published code passes the template string where token ids are expected
                # (and fails); the intended init is the template's own token embeddings.
                init_tokens = tokenizer([template]).to(device)
                with torch.no_grad():
                    emb = text.token_embedding(init_tokens)[0].float()
                    ctx.copy_(emb[_context_index(init_tokens, rel_t)[0]])
            self.text_encoder.ctx = ctx
        self.trains_text = self.coop or self.blocks is not None
        if self.trains_text:
            self.trained["text_encoder"] = self.text_encoder
        # Plain references (not submodules): the projections belong to the backbone.
        self.__dict__["image_proj"] = getattr(clip_model.visual, "proj", None)
        self.__dict__["text_proj"] = text.text_projection
        if cfg.proj_tuning:
            for name, proj in (("image_proj", self.image_proj), ("text_proj", self.text_proj)):
                if not isinstance(proj, nn.Parameter):
                    raise UserInputError(
                        f"proj_tuning needs the {name.split('_')[0]} projection as a matrix; "
                        f"{cfg.backbone!r} has {type(proj).__name__}"
                    )
                self.trained[name] = proj
        if cfg.clip_adapter:
            dim = int(
                self.text_proj.shape[1] if isinstance(self.text_proj, nn.Parameter) else self.text_proj.out_features
            )
            self.image_adapter = Adapter(dim, int(cfg.clip_adapter_dim)).to(device)
            self.text_adapter = Adapter(dim, int(cfg.clip_adapter_dim)).to(device)
            self.trained.update(image_adapter=self.image_adapter, text_adapter=self.text_adapter)
        self._cache: Optional[torch.Tensor] = None
        self._frozen_text: Optional[torch.Tensor] = None

    def _encode(self) -> torch.Tensor:
        # EOT feature after ln_final, before the projection, as the published PEFT_Text.
        text = text_parts(self.clip)
        dtype = text.token_embedding.weight.dtype
        x = text.token_embedding(self.tokens).to(dtype)
        if self.coop:
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(self.ctx_index)
            x = x.index_put((rows, self.ctx_index), self.text_encoder.ctx.to(dtype).expand(x.shape[0], -1, -1))
        x = x + text.positional_embedding.to(dtype)
        if self.blocks is None:
            x = text.transformer(x, attn_mask=getattr(text, "attn_mask", None))
        else:
            raw_len = x.shape[1]
            if not self.blocks[0].batch_first:
                x = x.transpose(0, 1)
            for blk in self.blocks:
                x = blk(x, raw_len)
            if not self.blocks[0].batch_first:
                x = x.transpose(0, 1)
        x = fp32_layer_norm(x, text.ln_final.weight, text.ln_final.bias, text.ln_final.eps)
        # Text prompts (l.pt) sit after the start token: the end token moves by their length.
        eot = self.tokens.argmax(dim=-1) + (x.shape[1] - self.tokens.shape[1])
        return x[torch.arange(x.shape[0], device=x.device), eot]

    def _state_key(self):
        # Changes whenever a trained tensor is updated in place (optimizer step, load).
        return tuple(
            (id(p), p._version)
            for m in self.trained.values()
            for p in ([m] if isinstance(m, nn.Parameter) else m.parameters())
        )

    def class_features(self) -> torch.Tensor:
        """Normalised class text features ``[K, E]``: computed with gradients while training,
        cached without them until a trained tensor changes (evaluation)."""
        key = self._state_key()
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if self.trains_text and torch.is_grad_enabled():
            unproj = self._encode()
        else:
            unproj = self._frozen_text
            if unproj is None or self.trains_text:
                chunks = []
                # Normal tensors even under evaluation's inference mode: they are reused later
                # in training steps, where inference tensors cannot enter autograd.
                with torch.inference_mode(False), torch.no_grad():
                    for i in range(0, self.tokens.shape[0], 1000):  # bound memory, as published
                        chunks.append(self._encode_rows(i, i + 1000))
                unproj = torch.cat(chunks)
                if not self.trains_text:  # the frozen text encoder's output never changes
                    self._frozen_text = unproj
        feats = _project(unproj, self.text_proj).float()
        if hasattr(self, "text_adapter"):
            feats = feats + self.text_adapter(feats)
        feats = F.normalize(feats, dim=-1)
        if not torch.is_grad_enabled():
            self._cache = (key, feats)
        return feats

    def _encode_rows(self, lo: int, hi: int) -> torch.Tensor:
        tokens, index = self.tokens, getattr(self, "ctx_index", None)
        try:
            self.tokens = tokens[lo:hi]
            if index is not None:
                self.ctx_index = index[lo:hi]
            return self._encode()
        finally:
            self.tokens = tokens
            if index is not None:
                self.ctx_index = index

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        """CLIP logits ``[B, K]`` from pre-projection image features."""
        img = _project(image_feats, self.image_proj).float()
        if hasattr(self, "image_adapter"):
            img = img + self.image_adapter(img)
        scale = self.clip.logit_scale.exp().float()
        return scale * F.normalize(img, dim=-1) @ self.class_features().T
