"""Qwen2.5-VL: the ViT encodes page images, the patch merger maps them to the LM width, the image
embeddings replace the ``<|image_pad|>`` token embeddings, and the mRoPE decoder reads the result.

Tensor parallelism applies to the language model (Megatron layers); the vision tower is replicated
on every TP rank (its inputs are the same on each TP rank, so are its gradients). Under context
parallelism the row's images are divided among the CP ranks instead (see parallel/context_parallel).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.config import Qwen25VLConfig
from megatron_vlm.models.language import KVCache, Qwen25LanguageModel, language_transformer_config
from megatron_vlm.models.vision import Qwen25VisionModel
from megatron_vlm.parallel.context_parallel import gather_image_embeddings


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None) -> PackedSeqParams:
    """Describe a packed row: ``cu_seqlens`` [N+1] int32 document borders (0 ... T)."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:  # one host read; loaders precompute it to keep the step sync-free
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def scatter_image_embeddings(embeddings: torch.Tensor, input_ids: torch.Tensor,
                             image_embeddings: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Put image embeddings [N, H] into the ``<|image_pad|>`` slots of embeddings [S, B, H]."""
    slots = (input_ids == image_token_id).transpose(0, 1)  # [S, B], like the embeddings
    if slots.shape != embeddings.shape[:2]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match embeddings {tuple(embeddings.shape)}")
    num_slots = int(slots.sum())
    if num_slots != image_embeddings.shape[0]:
        raise ValueError(
            f"the text has {num_slots} <|image_pad|> tokens but the images give {image_embeddings.shape[0]} "
            "embeddings: each image needs exactly (h/28)*(w/28) pad tokens for its resized size")
    return embeddings.masked_scatter(slots.unsqueeze(-1), image_embeddings.to(embeddings.dtype))


class Qwen25VLModel(MegatronModule):
    def __init__(self, config: Qwen25VLConfig, params_dtype: torch.dtype = torch.float32,
                 recompute: bool = False, init_weights: bool = True):
        transformer_config = language_transformer_config(
            config.language, parallel_state.get_tensor_model_parallel_world_size(), params_dtype, init_weights)
        super().__init__(config=transformer_config)
        self.model_config = config
        self.vision = Qwen25VisionModel(config.vision)
        self.vision.recompute = recompute
        self.language_model = Qwen25LanguageModel(transformer_config, config.language, recompute)
        self.to(params_dtype)  # norms and the vision tower too, as HF keeps them in the model dtype

    def set_rope_theta(self, rope_theta: float) -> None:
        self.model_config.language.rope_theta = float(rope_theta)
        self.language_model.set_rope_theta(rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        labels: Optional[torch.Tensor] = None,
        vision_plan=None,
        output_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids [B, S] (B = 1 for a packed row), position_ids [3, B, S] (see data.rope_index).

        Returns this rank's vocabulary shard of the logits [B, S, V/tp], or with ``labels`` the
        per-token cross-entropy [B, S] (fp32; masking and normalisation are the trainer's job).
        Under context parallelism (``packed_seq_params`` carrying a ``cp_plan``) every CP rank
        passes the whole padded row and gets back its own tokens only (``cp_plan.local_index``).
        ``output_index`` [K] (positions among the tokens this rank returns) restricts the output
        to those positions, [B, K, ...]: compute logits only where there is a loss.
        """
        embeddings = self.language_model.embed_tokens(input_ids)
        plan = getattr(packed_seq_params, "cp_plan", None)
        split_vision = plan is not None and plan.cp_size > 1 and pixel_values is not None
        if split_vision:  # each CP rank encodes its share of the row's images, then all share them
            image_embeddings = self._encode_images_over_cp(pixel_values, image_grid_thw, plan)
        elif pixel_values is not None:
            image_embeddings = self.vision(pixel_values, image_grid_thw, plan=vision_plan)
        if pixel_values is not None:
            embeddings = scatter_image_embeddings(embeddings, input_ids, image_embeddings,
                                                  self.model_config.image_token_id)
        elif self.training and torch.is_grad_enabled():
            embeddings = embeddings + self._vision_in_graph(input_ids.device).to(embeddings.dtype)
        if plan is not None and plan.cp_size > 1:
            # The whole row was embedded (images scattered in) first; now keep this CP rank's tokens.
            local = plan.local_index.to(embeddings.device)
            if embeddings.shape[0] != plan.rank_major_to_global.numel():
                raise ValueError(f"context parallelism got a row of {embeddings.shape[0]} tokens but its plan "
                                 f"covers {plan.rank_major_to_global.numel()}; pad the row for CP first")
            embeddings = embeddings.index_select(0, local)
            position_ids = position_ids.index_select(2, local)
            labels = None if labels is None else labels.index_select(1, local)
        logits = self.language_model(embeddings, position_ids, packed_seq_params, output_index)  # [S, B, V/tp]
        if output_index is not None and labels is not None:
            labels = labels.index_select(1, output_index)
        if labels is None:
            return logits.transpose(0, 1)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1))
        return loss.transpose(0, 1)

    # ------------------------------------------------------------------ inference (KV cache)
    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        """An empty ``KVCache`` for this model's decoder (preallocated to ``capacity`` tokens on the
        first forward; it grows past that when needed)."""
        return KVCache(len(self.language_model.decoder.layers), capacity)

    @torch.no_grad()
    def forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        output_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Inference step with a KV cache: logits [B, K, V/tp] of the new tokens at ``output_index``
        (default: the last one, K = 1).

        Prefill: the prompt's ``input_ids`` [B, S] and positions [3, B, S] with its images
        (encoded here, once) into an empty ``cache``. Decode: only the new tokens [B, s] (s = 1
        for greedy) with their positions; they attend to everything the cache holds. For
        Qwen2.5-VL a generated text token continues at max(prompt positions) + 1 + k on all three
        axes. Images must come with the tokens they fill (normally the prompt). No packing, no
        context parallelism; under TP each rank caches its own KV heads.
        """
        embeddings = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            image_embeddings = self.vision(pixel_values, image_grid_thw)
            embeddings = scatter_image_embeddings(embeddings, input_ids, image_embeddings,
                                                  self.model_config.image_token_id)
        if output_index is None:
            output_index = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        logits = self.language_model(embeddings, position_ids, output_index=output_index,
                                     inference_context=cache)
        return logits.transpose(0, 1)

    def _vision_in_graph(self, device: torch.device) -> torch.Tensor:
        """A zero that ran through the whole vision tower (one minimal 2x2-patch image).

        A micro-batch (or CP rank) without images still runs every vision module, so every rank
        issues the same collectives (FSDP gathers the tower's shards on all ranks at once, and
        reduces every gradient; skipping the tower on one rank would hang the others) and the
        result has the tower's own dtype, like real image embeddings."""
        merge = self.model_config.vision.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=device)
        pixels = torch.zeros(merge * merge, self.model_config.vision.patch_dim, device=grid.device)
        return 0.0 * self.vision(pixels, grid).sum()

    def _encode_images_over_cp(self, pixel_values, image_grid_thw, plan) -> torch.Tensor:
        """Each CP rank encodes its share of the row's images, then all ranks share the result.

        ``pixel_values`` holds either this rank's patches only (what the trainer passes: a rank
        receives only the pixels it encodes) or the whole row's (sliced here)."""
        if not plan.image_splits:
            raise ValueError("the context-parallel plan has no image split: build it with image_grid_thw")
        (first, last), (start, end) = plan.image_splits[plan.cp_rank], plan.patch_splits[plan.cp_rank]
        total = plan.patch_splits[-1][1]
        if pixel_values.shape[0] == total:
            pixel_values = pixel_values[start:end]
        elif pixel_values.shape[0] != end - start:
            raise ValueError(f"CP rank {plan.cp_rank} got {pixel_values.shape[0]} pixel rows; it encodes patches "
                             f"[{start}, {end}) of the row's {total}: pass those, or the whole row's")
        if last > first:
            local = self.vision(pixel_values, image_grid_thw[first:last])
        else:  # no image for this rank: still run the tower (same collectives, same dtype)
            zero = self._vision_in_graph(pixel_values.device)
            local = zero.new_zeros(0, self.model_config.vision.out_hidden_size) + zero
        return gather_image_embeddings(local, plan)


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards (for evaluation and parity checks)."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)
