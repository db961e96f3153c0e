"""AdapterMultiheadAttention: nn.MultiheadAttention whose packed q/k/v in-projection and out_proj are
AdapterLinear layers, adapted as PEFT adapts it (the attention between them is torch's own
computation, restated here)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig
from .layer import AdapterLinear


def is_attention(module: nn.Module) -> bool:
    """Whether ``inject`` adapts ``module`` as an attention layer: an nn.MultiheadAttention (not a subclass)
    with one packed in-projection (query, key and value of embed_dim features)."""
    return type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim


def _keep_in_proj_keys(module: "AdapterMultiheadAttention", state_dict, prefix: str, local_metadata) -> None:
    """State dicts keep nn.MultiheadAttention's keys: in_proj_weight / in_proj_bias, not in_proj.weight / .bias."""
    for name in ("weight", "bias"):
        state_dict.pop(f"{prefix}in_proj.{name}", None)


class AdapterMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with its packed in-projection and its out_proj adapted, as PEFT adapts it.

    ``in_proj``: the in-projection as a layer, W = in_proj_weight (3 E, E) and b = in_proj_bias (the same
    tensors, so ``in_proj_weight`` still reads them); ``out_proj``: the output projection. Each is an
    AdapterLinear (merge, unmerge, training rules, checkpoints as any adapted layer, under the names
    "<attention>.in_proj" and "<attention>.out_proj") or, when not adapted, a plain nn.Linear. The forward
    runs each projection through the fused op (q, k and v from one call when query, key and value are
    one tensor; else each from its rows of W and of the update) and between them computes what
    ``nn.functional.multi_head_attention_forward`` computes (masks, is_causal, bias_k / bias_v,
    add_zero_attn, attention dropout, need_weights, batch_first, unbatched inputs). State dicts keep
    nn.MultiheadAttention's keys (in_proj_weight, in_proj_bias, out_proj.weight, ...) beside the adapters'.
    Separate q/k/v projection weights (kdim or vdim other than embed_dim) are not adapted.
    """

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention, in_config: Optional[AdapterConfig],
                       out_config: Optional[AdapterConfig], layer_index: int = 0) -> "AdapterMultiheadAttention":
        """Wrap ``attention`` (sharing its tensors): the in-projection adapted with ``in_config`` (layer
        index ``layer_index``) and out_proj with ``out_config`` (``layer_index + 1``); None leaves one plain."""
        if not is_attention(attention):
            raise TypeError(f"expected an nn.MultiheadAttention with one packed in-projection (kdim = vdim = "
                            f"embed_dim), got {type(attention).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(layer, name, getattr(attention, name))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            layer.register_parameter(name, None)
        layer.bias_k, layer.bias_v = attention.bias_k, attention.bias_v
        embed = attention.embed_dim
        with torch.device("meta"):
            packed = nn.Linear(embed, 3 * embed, bias=attention.in_proj_bias is not None)
        packed.weight, packed.bias = attention.in_proj_weight, attention.in_proj_bias
        layer.in_proj = packed if in_config is None else \
            AdapterLinear.from_linear(packed, in_config, layer_index)
        layer.out_proj = attention.out_proj if out_config is None else \
            AdapterLinear.from_linear(attention.out_proj, out_config, layer_index + 1)
        layer._register_state_dict_hook(_keep_in_proj_keys)
        return layer.train(attention.training)

    @property
    def in_proj_weight(self) -> Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        return self.in_proj.bias

    def adapted_projections(self) -> list[AdapterLinear]:
        return [m for m in (self.in_proj, self.out_proj) if isinstance(m, AdapterLinear)]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, tensor in (("in_proj_weight", self.in_proj.weight), ("in_proj_bias", self.in_proj.bias)):
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("weight", "bias"):  # nn.MultiheadAttention's keys go to the in-projection layer
            if prefix + f"in_proj_{name}" in state_dict:
                state_dict[prefix + f"in_proj.{name}"] = state_dict.pop(prefix + f"in_proj_{name}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_attention(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention holding this layer's W + ΔW in new tensors (the plain projections'
        tensors and bias_k / bias_v themselves); this layer is left as it is."""
        with torch.device("meta"):
            plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                          bias=self.in_proj.bias is not None, add_bias_kv=self.bias_k is not None,
                                          add_zero_attn=self.add_zero_attn, batch_first=self.batch_first)
        in_proj = self.in_proj.to_linear() if isinstance(self.in_proj, AdapterLinear) else self.in_proj
        plain.in_proj_weight, plain.in_proj_bias = in_proj.weight, in_proj.bias
        plain.out_proj = self.out_proj.to_linear() if isinstance(self.out_proj, AdapterLinear) else self.out_proj
        plain.bias_k, plain.bias_v = self.bias_k, self.bias_v
        return plain.train(self.training)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (sequence first): one call for self-attention, else each from its rows of the packed W."""
        embed, in_proj = self.embed_dim, self.in_proj

        def rows(x: Tensor, start: int, stop: int) -> Tensor:
            if isinstance(in_proj, AdapterLinear):
                return in_proj.forward_rows(x, start, stop)
            bias = None if in_proj.bias is None else in_proj.bias[start:stop]
            return F.linear(x, in_proj.weight[start:stop], bias)

        if key is value:
            if query is key:
                packed = in_proj(query).unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
                packed = packed.contiguous()
                return packed[0], packed[1], packed[2]
            q = rows(query, 0, embed)
            pair = rows(key, embed, 3 * embed).unflatten(-1, (2, embed)).unsqueeze(0).transpose(0, -2)
            pair = pair.squeeze(-2).contiguous()
            return q, pair[0], pair[1]
        return rows(query, 0, embed), rows(key, embed, 2 * embed), rows(value, 2 * embed, 3 * embed)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if not self.adapted_projections():  # nothing adapted (unloaded): nn.MultiheadAttention's own forward
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:  # sequence first, keeping which inputs are the same tensor
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                is_causal: bool) -> tuple[Tensor, Optional[Tensor]]:
        """``F.multi_head_attention_forward`` on sequence-first inputs, its projections through the adapters."""
        heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed = query.shape
        if embed != self.embed_dim:
            raise ValueError(f"expected query of embed_dim {self.embed_dim} features, got {embed}")
        if key.shape != value.shape:
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention's rule)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal mask
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value)
        src_len = key.shape[0]
        if attn_mask is not None and attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask is not None and tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * heads, tgt_len, src_len)}.")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        head_dim = embed // heads
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            padding = padding.reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            scores = torch.bmm(scores, k.transpose(-2, -1)) if attn_mask is None else \
                torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            probabilities = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                probabilities = F.dropout(probabilities, p=dropout_p)
            out = torch.bmm(probabilities, v).transpose(0, 1).reshape(tgt_len * bsz, embed)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            probabilities = probabilities.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                probabilities = probabilities.mean(dim=1)
            if not is_batched:
                return out.squeeze(1), probabilities.squeeze(0)
            return out, probabilities
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
                attn_mask.view(bsz, heads, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                             k.view(bsz, heads, src_len, head_dim),
                                             v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed)).view(tgt_len, bsz, -1)
        return (out if is_batched else out.squeeze(1)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
