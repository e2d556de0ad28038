"""A causal LM's output layer as the chunked loss sees it: z = softcap(scale * (h @ W^T + b)).

Model families differ only after the final hidden states: an output bias (Phi, GPT-J), a multiplier (Cohere's
`logit_scale`, Falcon-H1's `lm_head_multiplier`, Granite's 1 / `logits_scaling`) and a final tanh soft-cap
(Gemma 2/3). The chunked loss writes its gradient by hand, so it needs these as formulas rather than as the
model's forward; they are read from the config here, only where the family's transformers forward applies
them (MPT's config has a `logit_scale` that transformers' MptForCausalLM never applies: the head ignores it
too, since the student must train on the logits the saved model produces), and `check_head` runs each
model once against its own forward so that a family whose logits are not reproduced is refused by name
instead of being trained on wrong numbers.

The hidden states come from the causal LM's base model (`base_model`), the decoder its forward calls: the
module named by `base_model_prefix`, or, where that names no module (Llama 4's text model says
`language_model` and holds `model`), the one pretrained sub-model beside the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakd.common.packing import forward_options


class HeadError(Exception):
    """The model's logits cannot be reproduced from its hidden states; the message names the family."""


@dataclass
class OutputHead:
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0  # multiplies the logits, before the soft-cap
    softcap: float | None = None  # z -> c * tanh(z / c)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        """h @ W^T + b in h's dtype, then float32 (float64 stays float64)."""
        u = h @ self.weight.to(h.dtype).t()
        if self.bias is not None:
            u = u + self.bias.to(u.dtype)
        return u if u.dtype == torch.float64 else u.float()

    def finish(self, u: torch.Tensor) -> torch.Tensor:
        """The family's post-processing, in place on the float buffer from `linear`."""
        if self.scale != 1.0:
            u.mul_(self.scale)
        if self.softcap is not None:
            u.div_(self.softcap).tanh_().mul_(self.softcap)
        return u

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.finish(self.linear(h))

    def local_slope(self, z: torch.Tensor) -> torch.Tensor | None:
        """dz/du per element where it is not a constant (the soft-cap's 1 - tanh^2), from the finished z."""
        if self.softcap is None:
            return None
        return 1.0 - (z / self.softcap).square_()

    def to_linear_grad(self, g: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """dL/du from dL/dz (in place): the chain rule through `finish`."""
        if slope is not None:
            g.mul_(slope)
        if self.scale != 1.0:
            g.mul_(self.scale)
        return g


# Config fields that a family's config carries but its transformers forward does not apply to the logits.
IGNORED = {
    "mpt": ("logit_scale",),  # MptForCausalLM: lm_head(hidden) as is, whatever logit_scale says (a number or "inv_sqrt_d_model")
}
# Multipliers of the logits: (config field, multiplied (True) or divided (False)).
SCALES = (
    ("logit_scale", True),  # Cohere, Cohere 2
    ("lm_head_multiplier", True),  # Falcon-H1
    ("logits_scaling", False),  # Granite, Granite MoE, Granite MoE hybrid
)


def _config_number(config, name: str, model: torch.nn.Module | None = None) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        family = f"{type(model).__name__} ({config.model_type})" if model is not None else config.model_type
        raise HeadError(f"{family}: its config's {name} is {value!r}, not a number; adakd reads {name} as a number "
                        "that scales the logits and checks the result against the model's own forward: write the "
                        f"number in config.json, or remove {name} if this family's forward does not use it") from None


def output_head(model: torch.nn.Module) -> OutputHead:
    """The head of a loaded causal LM, read from its output embedding and (text) config."""
    layer = model.get_output_embeddings()
    if layer is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise HeadError(f"{type(model).__name__}: no output embedding layer (get_output_embeddings() is None)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    ignored = IGNORED.get(getattr(config, "model_type", None), ())
    scale = 1.0
    for name, multiplied in SCALES:
        if name in ignored:
            continue
        value = _config_number(config, name, model)
        if value is not None:
            scale = scale * value if multiplied else scale / value
    softcap = _config_number(config, "final_logit_softcapping", model)
    return OutputHead(layer.weight, getattr(layer, "bias", None), scale, softcap or None)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder whose last hidden states the causal LM's output layer turns into logits.

    `base_model_prefix` names it in most families; where that attribute is missing (Llama4ForCausalLM says
    "language_model" and holds "model"), the one pretrained model among the causal LM's direct children."""
    from transformers import PreTrainedModel

    base = getattr(model, model.base_model_prefix, None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    subs = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    if len(subs) == 1:
        return subs[0]
    raise HeadError(f"{type(model).__name__} ({model.config.model_type}): no base model under "
                    f"{model.base_model_prefix!r}, and {len(subs)} pretrained sub-models instead of one")


def base_outputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, **extra):
    """The base model's outputs (last_hidden_state, and router_logits when asked with output_router_logits).

    Padded rows come with an attention mask; packed rows with position ids and no mask (`common.packing`)."""
    base = base_model(model)
    inputs = {"input_ids": input_ids, **forward_options(base), **extra}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return base(**inputs)


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, H) hidden states that the output layer turns into logits (the base model's last ones).

    Padded rows come with an attention mask; packed rows with position ids and no mask (`common.packing`)."""
    return base_outputs(model, input_ids, attention_mask, position_ids).last_hidden_state


@torch.no_grad()
def check_head(model: torch.nn.Module, what: str = "student", tokens: int = 12) -> OutputHead:
    """Compare `output_head` on `final_hidden` with the model's own logits once, on a short input.

    Raises HeadError naming the family when they differ: training on logits the saved model never
    produces would be silently wrong.
    """
    head = output_head(model)
    vocab = min(head.vocab_size, int(getattr(model.config.get_text_config(), "vocab_size", head.vocab_size) or head.vocab_size))
    device = head.weight.device
    ids = (torch.arange(2 * tokens, device=device).reshape(2, tokens) * 7919 + 3) % max(vocab, 1)
    mask = torch.ones_like(ids)
    mask[1, tokens // 2:] = 0  # a padded row: the attention mask must be honoured the same way
    was_training = model.training
    model.eval()
    try:
        ours = head.logits(final_hidden(model, ids, mask))
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
    except Exception as e:
        raise HeadError(f"the {what} {type(model).__name__} ({model.config.model_type}) cannot be run on a token "
                        f"batch to check its output layer ({type(e).__name__}: {e})") from e
    finally:
        model.train(was_training)
    keep = mask.bool()
    if ours.shape != theirs.shape:
        raise HeadError(f"the {what} {type(model).__name__} ({model.config.model_type}): its logits have shape "
                        f"{tuple(theirs.shape)}, its output layer gives {tuple(ours.shape)}; this family is not "
                        "supported")
    err = (ours[keep] - theirs[keep]).abs().max().item()
    tol = 1e-3 * max(1.0, theirs[keep].abs().max().item())
    if not err <= tol:
        raise HeadError(
            f"the {what} {type(model).__name__} ({model.config.model_type}) computes its logits in a way adakd's "
            f"chunked loss does not reproduce (largest difference {err:.3g}); this model family is not supported "
            f"as a {what}: supported output layers are a linear map with optional bias, logit scale/scaling and final "
            "soft-capping"
        )
    return head
