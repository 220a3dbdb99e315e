"""Optional quantization of the attention matmul inputs (q, k, v and the softmax output) via a diffusers
attention processor. With every quantizer disabled it calls the original processor, so outputs are exactly FP."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .quantizers import ActQuantizer


class QuantAttnProcessor(nn.Module):
    """Composes diffusers' processor; when enabled, follows diffusers.AttnProcessor with quantizers on the matmul
    operands (Q-Diffusion quantizes both attention matmuls: q.k^T and softmax(.).v)."""

    kind = "attn"

    def __init__(self, fp_processor: Any, act_bits: int, enabled: bool = True):
        super().__init__()
        # kept outside the module tree: diffusers processors may be plain objects
        self.__dict__["fp_processor"] = fp_processor
        self.aq_q = ActQuantizer(act_bits, enabled)
        self.aq_k = ActQuantizer(act_bits, enabled)
        self.aq_v = ActQuantizer(act_bits, enabled)
        self.aq_p = ActQuantizer(act_bits, enabled)

    def act_quantizers(self) -> list[ActQuantizer]:
        return [self.aq_q, self.aq_k, self.aq_v, self.aq_p]

    @property
    def act_bits(self) -> int:
        return self.aq_q.bits

    @property
    def act_quant_enabled(self) -> bool:
        return any(q.enabled for q in self.act_quantizers())

    def set_act_quant(self, enabled: bool) -> None:
        for q in self.act_quantizers():
            q.enabled = bool(enabled)

    def act_scales(self) -> list[float]:
        """Steps of [q, k, v, softmax-output]."""
        return [q.step() for q in self.act_quantizers()]

    def spec(self) -> dict:
        return {"kind": self.kind, "act_bits": self.act_bits, "act_quant": self.act_quant_enabled}

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if not any(q.enabled or q.calibrating for q in self.act_quantizers()):
            return self.fp_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=attention_mask, temb=temb, *args, **kwargs)
        return quant_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               self.act_quantizers())


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def quant_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                    attention_mask: Optional[torch.Tensor], temb: Optional[torch.Tensor],
                    quantizers: Sequence[Optional[Callable[[torch.Tensor], torch.Tensor]]],
                    qdq_graph: bool = False) -> torch.Tensor:
    """diffusers.AttnProcessor's math with `quantizers` (q, k, v, softmax output; None = not quantized) on the
    operands of both attention matmuls: the one implementation of the fake-quant model and the QDQ export view.

    qdq_graph=True writes the scores as MatMul(q, DQ(k^T)) * scale, k quantized after its transpose (per-tensor, so
    the values are the same), so that the exported MatMuls consume DequantizeLinear outputs directly; False uses
    diffusers' get_attention_scores (baddbmm), as the fake-quant model always has.
    Masks: applied as diffusers applies them (prepared, then added to the scaled scores) in both forms. The
    exported UNet's signature (sample, timestep[, encoder_hidden_states]) has no mask input, so none reaches the
    export; the fake-quant model accepts the masks its FP processor accepts."""
    q_q, q_k, q_v, q_p = [q if q is not None else _identity for q in quantizers]
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    if attention_mask is not None:
        b, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, b)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query = q_q(attn.head_to_batch_dim(query))
    key = attn.head_to_batch_dim(key)
    key = q_k(key.transpose(-1, -2)) if qdq_graph else q_k(key)
    value = q_v(attn.head_to_batch_dim(value))
    if qdq_graph:
        scores = torch.matmul(query, key) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype) if attn.upcast_softmax else scores.softmax(dim=-1)
        hidden_states = attn.batch_to_head_dim(torch.matmul(q_p(probs), value))
    else:
        probs = q_p(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor
