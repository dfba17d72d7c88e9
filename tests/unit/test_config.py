"""Config reading/writing against transformers' Qwen2_5_VLConfig and literal public config.json files."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_vlm.config import PRESETS, ConfigError, Qwen25VLConfig, qwen25vl_3b, qwen25vl_7b

# Qwen/Qwen2.5-VL-7B-Instruct config.json (pre-4.52 layout: LM keys at the top level).
LEGACY_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

# Qwen/Qwen2.5-VL-3B-Instruct differs in the LM geometry, tied embeddings and the merger width.
LEGACY_3B = {
    **LEGACY_7B,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "vision_config": {**LEGACY_7B["vision_config"], "out_hidden_size": 2048},
}


def _current_layout(legacy: dict) -> dict:
    """The same model written by transformers itself in the nested (>= 4.52) layout."""
    text = {k: legacy[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                                   "max_position_embeddings", "hidden_act", "tie_word_embeddings")}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 24]}
    vision = {k: v for k, v in legacy["vision_config"].items() if k not in ("in_chans", "spatial_patch_size")}
    vision["in_channels"] = 3
    hf = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                          tie_word_embeddings=legacy["tie_word_embeddings"])
    d = hf.to_dict()
    assert "text_config" in d and "hidden_size" not in d  # really the nested layout
    return d


@pytest.mark.parametrize("legacy,preset", [(LEGACY_7B, qwen25vl_7b), (LEGACY_3B, qwen25vl_3b)])
def test_legacy_layout_equals_preset(legacy, preset):
    assert Qwen25VLConfig.from_hf_dict(copy.deepcopy(legacy)) == preset()


@pytest.mark.parametrize("legacy,preset", [(LEGACY_7B, qwen25vl_7b), (LEGACY_3B, qwen25vl_3b)])
def test_current_layout_equals_preset(legacy, preset):
    assert Qwen25VLConfig.from_hf_dict(_current_layout(legacy)) == preset()


def test_legacy_in_chans_and_current_in_channels_are_read():
    d = copy.deepcopy(LEGACY_7B)
    d["vision_config"]["in_chans"] = 1
    assert Qwen25VLConfig.from_hf_dict(d).vision.in_channels == 1
    d = qwen25vl_7b().to_hf_dict()
    d["vision_config"] = {k: v for k, v in d["vision_config"].items() if k != "in_chans"}
    d["vision_config"]["in_channels"] = 4
    assert Qwen25VLConfig.from_hf_dict(d).vision.in_channels == 4


def test_preset_values_are_the_public_ones():
    c7, c3 = qwen25vl_7b(), qwen25vl_3b()
    assert (c7.language.hidden_size, c7.language.num_layers, c7.language.num_attention_heads,
            c7.language.num_kv_heads, c7.language.ffn_hidden_size, c7.language.vocab_size,
            c7.language.rope_theta, c7.language.tie_word_embeddings) == (3584, 28, 28, 4, 18944, 152064, 1e6, False)
    assert (c3.language.hidden_size, c3.language.num_layers, c3.language.num_attention_heads,
            c3.language.num_kv_heads, c3.language.ffn_hidden_size, c3.language.vocab_size,
            c3.language.tie_word_embeddings) == (2048, 36, 16, 2, 11008, 151936, True)
    v = c7.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.window_size,
            v.fullatt_block_indexes, v.tokens_per_second) == (32, 1280, 16, 3420, 3584, 112, (7, 15, 23, 31), 2)
    assert c3.vision.out_hidden_size == 2048
    assert c7.language.mrope_section == (16, 24, 24)


def test_legacy_layout_agrees_with_transformers():
    """transformers reads the legacy dict to the same values we do."""
    for legacy in (LEGACY_7B, LEGACY_3B):
        ours = Qwen25VLConfig.from_hf_dict(copy.deepcopy(legacy))
        hf = Qwen2_5_VLConfig(**copy.deepcopy(legacy))
        _assert_hf_matches(hf, ours)


def _assert_hf_matches(hf: Qwen2_5_VLConfig, c: Qwen25VLConfig):
    t, v, lm, vis = hf.text_config, hf.vision_config, c.language, c.vision
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.max_position_embeddings, t.hidden_act) == (
        lm.vocab_size, lm.hidden_size, lm.num_layers, lm.num_attention_heads, lm.num_kv_heads,
        lm.ffn_hidden_size, lm.max_position_embeddings, lm.hidden_act)
    assert t.rms_norm_eps == pytest.approx(lm.rms_norm_eps) and t.rope_theta == pytest.approx(lm.rope_theta)
    assert list(t.rope_scaling["mrope_section"]) == list(lm.mrope_section)
    assert t.tie_word_embeddings == lm.tie_word_embeddings
    assert hf.get_text_config(decoder=True).tie_word_embeddings == lm.tie_word_embeddings
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size, v.patch_size,
            v.temporal_patch_size, v.spatial_merge_size, v.in_channels, v.window_size, v.tokens_per_second,
            list(v.fullatt_block_indexes)) == (
        vis.depth, vis.hidden_size, vis.num_heads, vis.intermediate_size, vis.out_hidden_size, vis.patch_size,
        vis.temporal_patch_size, vis.spatial_merge_size, vis.in_channels, vis.window_size, vis.tokens_per_second,
        list(vis.fullatt_block_indexes))
    assert (hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id) == (
        c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_loads_in_transformers(name):
    c = PRESETS[name]()
    d = c.to_hf_dict()
    assert d["model_type"] == "qwen2_5_vl" and d["tie_word_embeddings"] == c.language.tie_word_embeddings
    hf = Qwen2_5_VLConfig(**copy.deepcopy(d))
    _assert_hf_matches(hf, c)
    assert hf.tie_word_embeddings == c.language.tie_word_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_rope_theta_override_reaches_transformers(name):
    c = PRESETS[name]()
    moved = c.with_rope_theta(4e6)
    assert c.language.rope_theta == 1e6  # a copy: the original is untouched
    d = moved.to_hf_dict()
    assert d["text_config"]["rope_theta"] == 4e6 and d["rope_theta"] == 4e6
    hf = Qwen2_5_VLConfig(**copy.deepcopy(d))
    assert hf.text_config.rope_theta == 4e6
    assert Qwen25VLConfig.from_hf_dict(d).language.rope_theta == 4e6
    assert c.with_rope_theta(None) == c


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name):
    c = PRESETS[name]()
    assert Qwen25VLConfig.from_hf_dict(c.to_hf_dict()) == c
    moved = c.with_rope_theta(4e6)
    assert Qwen25VLConfig.from_hf_dict(moved.to_hf_dict()) == moved
    # transformers' own re-serialisation of our export reads back the same
    assert Qwen25VLConfig.from_hf_dict(Qwen2_5_VLConfig(**copy.deepcopy(c.to_hf_dict())).to_dict()) == c


def test_round_trip_keeps_unknown_base_keys():
    base = copy.deepcopy(LEGACY_7B)
    d = qwen25vl_7b().to_hf_dict(base=base)
    assert d["bos_token_id"] == 151643 and d["vision_config"]["spatial_patch_size"] == 14
    assert Qwen25VLConfig.from_hf_dict(d) == qwen25vl_7b()
    assert base == LEGACY_7B  # the base is not modified


def _tiny_text(tie: bool) -> dict:
    return dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=tie,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})


_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
                    fullatt_block_indexes=[0])


@pytest.mark.parametrize("text_tie,top_tie", [(False, True), (True, False), (True, True), (False, False)])
def test_tie_follows_what_transformers_builds(text_tie, top_tie):
    """A nested config whose text_config flag and top-level copy disagree: we tie iff HF ties."""
    hf_cfg = Qwen2_5_VLConfig(text_config=_tiny_text(text_tie), vision_config=dict(_TINY_VISION),
                              tie_word_embeddings=top_tie)
    d = hf_cfg.to_dict()
    assert d["tie_word_embeddings"] == top_tie and d["text_config"]["tie_word_embeddings"] == text_tie
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    hf_ties = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert Qwen25VLConfig.from_hf_dict(d).language.tie_word_embeddings == hf_ties


def test_tiny_export_ties_in_transformers():
    """Our export of a tied config builds a tied HF model, and an untied one an untied model."""
    for tie in (True, False):
        c = PRESETS["tiny"]()
        c.language.tie_word_embeddings = tie
        c.language.vocab_size = 128
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c.to_hf_dict()))
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie


# ---------------------------------------------------------------------- errors
def test_wrong_model_type_is_named():
    d = copy.deepcopy(LEGACY_7B)
    d["model_type"] = "llava"
    with pytest.raises(ConfigError, match="llava"):
        Qwen25VLConfig.from_hf_dict(d)
    del d["model_type"]
    with pytest.raises(ConfigError, match="model_type"):
        Qwen25VLConfig.from_hf_dict(d)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_language_key(key):
    d = copy.deepcopy(LEGACY_7B)
    del d[key]
    with pytest.raises(ConfigError, match=key):
        Qwen25VLConfig.from_hf_dict(d)
    nested = _current_layout(LEGACY_7B)
    del nested["text_config"][key]
    with pytest.raises(ConfigError, match=key):
        Qwen25VLConfig.from_hf_dict(nested)


@pytest.mark.parametrize("key", ["depth", "num_heads", "hidden_size"])
def test_missing_vision_key(key):
    d = copy.deepcopy(LEGACY_7B)
    del d["vision_config"][key]
    with pytest.raises(ConfigError, match=key):
        Qwen25VLConfig.from_hf_dict(d)


def test_missing_vision_config():
    d = copy.deepcopy(LEGACY_7B)
    del d["vision_config"]
    with pytest.raises(ConfigError, match="vision_config"):
        Qwen25VLConfig.from_hf_dict(d)


@pytest.mark.parametrize("section", [[16, 24, 16], [16, 24, 32]])
def test_mrope_section_must_fit_head_dim(section):
    d = copy.deepcopy(LEGACY_7B)
    d["rope_scaling"]["mrope_section"] = section
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen25VLConfig.from_hf_dict(d)
    d = copy.deepcopy(LEGACY_7B)
    d["hidden_size"] = 28 * 64  # head_dim 64 against a section covering 128
    d["vision_config"]["out_hidden_size"] = 28 * 64
    with pytest.raises(ConfigError, match="head_dim"):
        Qwen25VLConfig.from_hf_dict(d)


def test_kv_heads_must_divide_heads():
    d = copy.deepcopy(LEGACY_7B)
    d["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Qwen25VLConfig.from_hf_dict(d)


@pytest.mark.parametrize("indexes", [[7, 15, 23, 32], [-1, 7]])
def test_fullatt_index_out_of_range(indexes):
    d = copy.deepcopy(LEGACY_7B)
    d["vision_config"]["fullatt_block_indexes"] = indexes
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        Qwen25VLConfig.from_hf_dict(d)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
