"""A mixture-of-experts student's router load-balancing loss, added the way its family's own training adds it.

transformers' MoE causal LMs that train with an auxiliary router loss (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
GraniteMoE, GraniteMoE-hybrid, Jamba, GPT-OSS) compute, in their `forward`, when asked for router logits
(`output_router_logits`):

    loss = LM loss + router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)

(the Switch Transformer loss: experts' token fractions times their mean router probabilities, padding
excluded through the 2-D attention mask). Distillation trains through the base model and the chunked output
head, never through that forward, so without this module the term is silently dropped and nothing keeps the
experts balanced over a long run. `router_loss` finds it where the family has it: the family's own
`load_balancing_loss_func` (from the causal LM's modeling module, called by its forward), its coefficient
(`router_aux_loss_coef` > 0) and the causal LM's `num_experts` / `num_experts_per_tok`; `StudentLoss` then
asks the base model for its router logits in the same forward that gives the hidden states.

It is added whenever the config's coefficient is positive, whatever `output_router_logits` says: that flag
only decides whether transformers' forward returns (and so adds) the term, and pretrained MoE configs ship
it off (Mixtral's, Qwen's) although the models were trained with it; `train-student --no-router-aux-loss`
trains without it. Families without such a term get none: DeepSeek V2/V3 and GLM-4 MoE balance their
routers without an auxiliary loss (an expert bias), Llama 4's forward adds none.

Padding: padded rows pass their attention mask, as the family's training does. Packed rows
(`common.packing`) have no attention mask; their batch carries `real_mask` (B, T), true on real tokens, false
on each row's trailing padding (`StudentLoss` gets it beside the model's inputs), and that is the mask passed: the same real tokens, the same router logits,
so the loss over packed rows equals the loss over the same sequences padded.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RouterLoss:
    """The family's load-balancing function with its arguments; `coef` multiplies it in the training loss."""

    func: Callable
    num_experts: int
    top_k: int
    coef: float
    family: str

    def __call__(self, router_logits, mask: torch.Tensor | None) -> torch.Tensor:
        """The auxiliary loss of one forward's router logits (a tuple over MoE layers of (B*T, experts)), the
        (B, T) mask of real tokens excluding the rest (None: every token counts)."""
        aux = self.func(router_logits, self.num_experts, self.top_k, mask)
        if not isinstance(aux, torch.Tensor):  # the family's function returns 0 when it got no router logits
            raise RuntimeError(f"{self.family}: the base model returned no router logits (output_router_logits)")
        return aux


def router_loss(model: torch.nn.Module) -> RouterLoss | None:
    """The router load-balancing loss that `model`'s own training adds, or None when its family has none or its
    coefficient is 0."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    coef = getattr(config, "router_aux_loss_coef", None)
    if not isinstance(coef, (int, float)) or not coef > 0:
        return None
    module = sys.modules.get(type(model).__module__)
    func = getattr(module, "load_balancing_loss_func", None)
    if func is None or "load_balancing_loss_func" not in inspect.unwrap(type(model).forward).__code__.co_names:
        return None  # the family's forward adds no such term
    experts = getattr(model, "num_experts", None) or getattr(config, "num_local_experts", None) or \
        getattr(config, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    if not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    return RouterLoss(func, experts, top_k, float(coef), f"{type(model).__name__} ({config.model_type})")


def aux_mask(inputs: dict[str, torch.Tensor], real_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) mask of real tokens of a batch: the attention mask of padded rows (`Batch.model_inputs`), the
    batch's `real_mask` for packed rows (as the attention mask's dtype), None for rows without padding."""
    if inputs.get("attention_mask") is not None:
        return inputs["attention_mask"]
    return None if real_mask is None else real_mask.long()


__all__ = ["RouterLoss", "aux_mask", "router_loss"]
