"""The Qwen2.5-VL language model on Megatron-Core building blocks.

Megatron-Core supplies the tensor-parallel pieces (VocabParallelEmbedding, Column/RowParallelLinear,
TransformerBlock/TransformerLayer, the fused-QKV GQA layout and its sharded checkpoint logic). Two
pieces are ours, because Megatron's versions assume CUDA and one long sequence:

* ``MRopeSelfAttention`` applies our multimodal rotary embedding (per-token cos/sin tables computed
  once per forward from the [3, T] positions) and calls
* ``VarlenCoreAttention``, which attends within each packed document (``cu_seqlens``) through the
  backends of ``models/attention.py``.

Inference (greedy evaluation) passes a ``KVCache`` as Megatron's ``inference_context``: the first
forward (prefill) attends causally over the prompt through ``VarlenCoreAttention`` and stores every
layer's keys (after mRoPE) and values; later forwards (decode) feed only the new tokens, which
attend to the cache through ``attention.cached_attention``. Training never passes one.

Parameter names follow Megatron's GPTModel (``embedding.word_embeddings``, ``decoder.layers.N...``,
``decoder.final_layernorm``, ``output_layer``) so Megatron users recognise the checkpoints.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_vlm.config import LanguageConfig
from megatron_vlm.kernels.mrope import MRope, inverse_frequencies
from megatron_vlm.models.attention import cached_attention, varlen_attention
from megatron_vlm.models.norms import RMSNorm
from megatron_vlm.parallel.context_parallel import ulysses_attention


def language_transformer_config(
    cfg: LanguageConfig,
    tensor_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
) -> TransformerConfig:
    """Megatron TransformerConfig for the Qwen2.5 decoder (CPU-safe: no fusions, CPU init)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=init_weights,  # off when a checkpoint overwrites every weight
        init_method_std=0.02,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
    )


class VarlenCoreAttention(MegatronModule):
    """Core attention over packed documents; the only attention the LM uses.

    Inputs are Megatron's [S, B, H, D]. With ``packed_seq_params`` the batch must be one packed row
    and its ``cu_seqlens_q`` marks the documents; without it every batch row is one document.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"the Qwen2.5 decoder is causal; got attn_mask_type {attn_mask_type}")
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        seq, batch, heads, dim = query.shape
        plan = getattr(packed_seq_params, "cp_plan", None)
        if plan is not None and plan.cp_size > 1:
            if batch != 1:
                raise ValueError(f"context parallelism splits one packed row; got batch size {batch}")

            def attend(q, k, v, cu_seqlens, max_seqlen):
                return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True,
                                        softmax_scale=self.softmax_scale)

            out = ulysses_attention(query[:, 0], key[:, 0], value[:, 0], plan, attend)
            return out.reshape(seq, 1, heads * dim)
        if packed_seq_params is not None:
            if batch != 1:
                raise ValueError(f"packed rows come one per micro-batch; got batch size {batch}")
            cu_seqlens = packed_seq_params.cu_seqlens_q
            max_seqlen = packed_seq_params.max_seqlen_q
        else:
            cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
            max_seqlen = seq

        def to_thd(t):  # [S, B, H, D] -> [B*S, H, D], documents contiguous
            return t.transpose(0, 1).reshape(batch * seq, t.shape[2], dim)

        out = varlen_attention(to_thd(query), to_thd(key), to_thd(value), cu_seqlens, max_seqlen,
                               causal=True, softmax_scale=self.softmax_scale)
        return out.reshape(batch, seq, heads * dim).transpose(0, 1).contiguous()


class KVCache:
    """Keys (after mRoPE) and values of every decoder layer for the tokens seen so far.

    A small explicit cache for greedy decoding, passed to the decoder as ``inference_context``.
    Per layer one preallocated buffer pair [B, Hkv, capacity, D] (this rank's KV heads: under
    TP each rank caches its own shard); it grows (doubling) when a forward would overflow it.
    Every layer appends its new K/V at ``length`` during a forward; ``advance`` (called by the
    language model after the whole decoder ran) commits them.
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self.capacity = int(capacity)
        self.length = 0  # tokens committed

    # Megatron's TransformerLayer/Block may ask these of an inference context.
    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        return self.length > 0

    def _ensure(self, layer: int, key: torch.Tensor, needed: int) -> None:
        buf = self.keys[layer]
        if buf is not None and buf.shape[2] >= needed:
            return
        batch, heads, dim = key.shape[1], key.shape[2], key.shape[3]
        capacity = max(needed, self.capacity, 2 * (buf.shape[2] if buf is not None else 0))
        new_k = key.new_empty(batch, heads, capacity, dim)
        new_v = key.new_empty(batch, heads, capacity, dim)
        if buf is not None:
            new_k[:, :, :self.length] = buf[:, :, :self.length]
            new_v[:, :, :self.length] = self.values[layer][:, :, :self.length]
        self.keys[layer], self.values[layer] = new_k, new_v
        self.capacity = capacity

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one layer's new key/value [S, B, Hkv, D]; returns the layer's cache [B, Hkv, L, D]
        (views, L = length + S) including them."""
        seq = key.shape[0]
        end = self.length + seq
        self._ensure(layer, key, end)
        k_buf, v_buf = self.keys[layer], self.values[layer]
        k_buf[:, :, self.length:end] = key.permute(1, 2, 0, 3)
        v_buf[:, :, self.length:end] = value.permute(1, 2, 0, 3)
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += int(tokens)


class MRopeSelfAttention(SelfAttention):
    """Self-attention with multimodal rotary embedding.

    ``rotary_pos_emb`` is the ``MRope`` of this forward (made once by ``Qwen25LanguageModel``): the
    fused kernel on GPU, shared reference tables elsewhere; Megatron's own rotary path is bypassed.
    """

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, **unused):
        if inference_context is not None:
            return self._forward_cached(hidden_states, inference_context, rotary_pos_emb)
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        # value is a view of the fused qkv output; a copy lets that whole buffer go after the
        # forward instead of being kept for backward (2(H + kv) bytes per token per layer)
        value = value.contiguous()
        if rotary_pos_emb is not None:
            query, key = rotary_pos_emb.apply(query, key)
        context = self.core_attention(query, key, value, attention_mask,
                                      attn_mask_type=self.attn_mask_type, packed_seq_params=packed_seq_params)
        return self.linear_proj(context)

    def _forward_cached(self, hidden_states, cache: "KVCache", rotary_pos_emb):
        """Inference with a ``KVCache``: the prompt (empty cache) through the same causal core
        attention as training, later tokens against the cached keys/values."""
        if not isinstance(cache, KVCache):
            raise NotImplementedError(f"MRopeSelfAttention decodes with a KVCache, not {type(cache).__name__}")
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        if rotary_pos_emb is not None:
            query, key = rotary_pos_emb.apply(query, key)
        past = cache.length
        keys, values = cache.update(self.layer_number - 1, key, value)
        if past == 0:
            context = self.core_attention(query, key, value.contiguous(), None,
                                          attn_mask_type=self.attn_mask_type, packed_seq_params=None)
        else:
            seq, batch = query.shape[:2]
            out = cached_attention(query.permute(1, 2, 0, 3), keys, values,
                                   softmax_scale=self.core_attention.softmax_scale)  # [B, Hq, S, D]
            context = out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
        return self.linear_proj(context)


class Qwen25DecoderLayer(TransformerLayer):
    """Megatron's TransformerLayer with optional full activation recompute per layer.

    Uses ``torch.utils.checkpoint`` (non-reentrant) rather than Megatron's block-level recompute,
    which saves CUDA RNG states and so cannot run on CPU; there is no dropout, so nothing is lost.
    """

    recompute: bool = False

    def forward(self, *args, **kwargs):
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


def _mark_tensor_parallel_weights(module: torch.nn.Module) -> None:
    """Tag sharded weights with Megatron's TP attributes even when they were not initialised.

    Megatron sets ``tensor_model_parallel``/``partition_dim`` only inside its init functions, so a
    model built without init (to be filled from a checkpoint) would lack them, and grad-norm
    clipping and shard gathering would treat shards as replicas.
    """
    partition_dims = {tensor_parallel.VocabParallelEmbedding: 0, tensor_parallel.ColumnParallelLinear: 0,
                      tensor_parallel.RowParallelLinear: 1}
    for sub in module.modules():
        dim = next((d for cls, d in partition_dims.items() if isinstance(sub, cls)), None)
        weight = getattr(sub, "weight", None) if dim is not None else None
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def qwen25_layer_spec() -> ModuleSpec:
    """One Qwen2.5 decoder layer: pre-RMSNorm GQA attention (qkv bias) and pre-RMSNorm SwiGLU MLP."""
    return ModuleSpec(
        module=Qwen25DecoderLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=MRopeSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=VarlenCoreAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=tensor_parallel.ColumnParallelLinear,
                    linear_fc2=tensor_parallel.RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class Qwen25LanguageModel(MegatronModule):
    """Token embedding -> Megatron TransformerBlock with mRoPE -> final RMSNorm -> vocab projection."""

    def __init__(self, config: TransformerConfig, lm: LanguageConfig, recompute: bool = False):
        super().__init__(config=config)
        self.lm = lm
        self.embedding = LanguageModelEmbedding(
            config=config, vocab_size=lm.vocab_size, max_sequence_length=lm.max_position_embeddings,
            position_embedding_type="rope",  # no learned positions: rotary is applied in attention
        )
        self.decoder = TransformerBlock(config=config, spec=qwen25_layer_spec(), post_layer_norm=True,
                                        pre_process=True, post_process=True)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            lm.hidden_size, lm.vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=False,
            skip_weight_param_allocation=lm.tie_word_embeddings,
        )
        for layer in self.decoder.layers:
            layer.recompute = recompute
        _mark_tensor_parallel_weights(self)
        # A plain attribute, not a buffer: ``model.to(bf16)`` must not round the frequencies.
        self.inv_freq = inverse_frequencies(lm.head_dim, lm.rope_theta)

    def set_rope_theta(self, rope_theta: float) -> None:
        """Change the rope base (LongPT: 1e6 -> 4e6); no weights change."""
        self.lm.rope_theta = float(rope_theta)
        self.inv_freq = inverse_frequencies(self.lm.head_dim, self.lm.rope_theta)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [S, B, H] embeddings (Megatron's sequence-first layout)."""
        return self.embedding.word_embeddings(input_ids).transpose(0, 1).contiguous()

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> MRope:
        """The mRoPE of this forward from 3-D positions [3, B, S] (tokens flattened as (s, b))."""
        _, batch, seq = position_ids.shape
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        flat = position_ids.transpose(1, 2).reshape(3, seq * batch)
        return MRope(flat, self.inv_freq, self.lm.mrope_section, dtype)

    def forward(self, decoder_input: torch.Tensor, position_ids: torch.Tensor,
                packed_seq_params: Optional[PackedSeqParams] = None,
                output_index: Optional[torch.Tensor] = None,
                inference_context: Optional[KVCache] = None) -> torch.Tensor:
        """[S, B, H] input embeddings -> [S, B, V / tp] logits (this rank's vocabulary shard).

        ``output_index`` (sequence positions) projects only those hidden states to the vocabulary:
        LongPT supervises a short answer after ~128K tokens of pages, and full-row logits would
        be the largest tensor of the step (128K x 152K).
        ``inference_context`` (a ``KVCache``, inference only) appends these tokens' keys/values to
        the cache and attends to what it already holds (one unpacked sequence per batch row).
        """
        rotary = self.rotary(position_ids, decoder_input.dtype)
        if inference_context is None:
            hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                                  packed_seq_params=packed_seq_params)
        else:
            if packed_seq_params is not None:
                raise NotImplementedError("KV-cache inference runs unpacked sequences (no packed_seq_params)")
            hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                                  inference_context=inference_context)
            inference_context.advance(decoder_input.shape[0])
        if output_index is not None:
            hidden = hidden.index_select(0, output_index)
        weight = self.embedding.word_embeddings.weight if self.lm.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.lm.tie_word_embeddings:  # the output projection *is* the embedding: store it once
            sd.pop(f"{prefix}output_layer.weight", None)
        return sd
