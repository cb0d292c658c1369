"""The model runner: one packed step through the transformers model, logits of the sampled rows.

The model runs with the ``expertlora`` attention (kv_cache.py) and no transformers cache: the
step's AttentionPlan travels as a keyword argument down to every attention layer, and the
per-token adapter slots go to the MoE layers and the per-token LoRA modules through the model's
BatchAdapters for the duration of the call.
"""

from __future__ import annotations

import torch

from ..integration import LoadedModel
from .batch import StepBatch
from .kv_cache import ATTENTION_IMPLEMENTATION, LayerShape, ShapeProbe, register


class ModelRunner:
    def __init__(self, lm: LoadedModel):
        register()
        self.lm = lm
        self.model = lm.model
        self.model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
        self.device = self.model.device

    def layer_shapes(self) -> dict[int, LayerShape]:
        """Each attention layer's K/V heads and sizes, from one probing forward of one token."""
        probe = ShapeProbe()
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.lm.use([None])
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=ids, use_cache=False, logits_to_keep=1, expertlora_step=probe)
        return probe.shapes

    def run(self, batch: StepBatch) -> torch.Tensor:
        """[n, V] float32 logits of ``batch.logits_rows``."""
        self.lm.batch.set(batch.adapter_slots)  # one "sequence" per token: packed rows, each its own slot
        try:
            with torch.no_grad():
                out = self.model(
                    input_ids=batch.input_ids, position_ids=batch.positions, use_cache=False,
                    logits_to_keep=batch.logits_rows, expertlora_step=batch.plan,
                )
        finally:
            self.lm.batch.set(None)
        return out.logits[0].float()
