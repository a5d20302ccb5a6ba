"""Every transformers model type, built small from its default config by a generic shrink.

``hf_zoo`` holds 37 hand-written configs (they also drive the export test). This module reaches
the rest of ``transformers.CONFIG_MAPPING``: take the type's default config, override the size
fields it has (widths, depths, heads, vocabulary, image and audio sizes, mixture-of-experts
counts), in every sub-config too, rebuild it so derived fields follow, and build the model with
``AutoModel`` (or the type's own model class where ``AutoModel`` has none). A few types need a
hand override; :data:`OVERRIDES` holds them, each with why.

What each type does when converted is measured by ``benchmarks/hf_zoo_sweep.py`` and recorded in
:data:`RESULTS` (``tests/zoo/hf_all.jsonl``); ``tests/test_zoo_hf_all.py`` checks it still holds.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Over this, a type's small build is "too large for CI" (2 CPU cores).
MAX_PARAMS = 5_000_000
MAX_FORWARD_S = 10.0

WIDTH, HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 32, 2, 16, 64, 2, 128

# Scalar size fields: set wherever a config (or sub-config) has them and they are not None.
SCALARS: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "embedding_dim",
                     "word_embed_proj_dim", "projection_dim", "text_embed_dim",
                     "vision_embed_dim", "attention_hidden_size", "lru_width",
                     "hidden_dim", "d_inner", "decoder_hidden_size", "encoder_hidden_size",
                     "mlp_dim", "proj_dim", "output_hidden_size", "latent_dim"), WIDTH),
    **dict.fromkeys(("embedding_size",), 16),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depth",
                     "text_layers", "vision_layers", "num_self_attends_per_block"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_encoder_attention_heads",
                     "num_decoder_attention_heads", "num_key_value_heads", "num_kv_heads",
                     "multi_query_group_num", "n_kv_heads", "num_heads"), HEADS),
    # Mamba mixers: heads * head size must be expand (2) * hidden_size
    **dict.fromkeys(("mamba_n_heads",), 4),
    **dict.fromkeys(("mamba_d_head",), 16),
    **dict.fromkeys(("n_groups", "mamba_n_groups", "num_groups_ssm"), 1),
    **dict.fromkeys(("mamba_d_state",), 8),
    **dict.fromkeys(("rotary_dim",), 8),
    **dict.fromkeys(("window_size",), 4),  # Swin-like windows over 32x32 images, patch 4
    **dict.fromkeys(("num_groups",), 8),  # group norms over the 16-channel stages below
    **dict.fromkeys(("head_dim", "d_kv", "d_head", "kv_channels", "attention_head_dim",
                     "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim",
                     "linear_key_head_dim", "linear_value_head_dim"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                     "d_ff", "n_inner", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "mlp_hidden_size", "ffn_hidden_size", "expert_intermediate_size"), FFN),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts",
                     "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "n_shared_experts",
                     "num_shared_experts"), 1),
    **dict.fromkeys(("vocab_size", "text_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len",
                     "max_sequence_length", "context_length", "n_ctx", "max_length",
                     "max_source_positions", "max_target_positions"), 128),
    **dict.fromkeys(("image_size", "img_size", "vision_image_size"), 32),
    **dict.fromkeys(("patch_size",), 8),
    **dict.fromkeys(("num_mel_bins", "feature_size"), 16),
    **dict.fromkeys(("state_size", "ssm_state_size", "d_state", "time_step_rank"), 8),
    **dict.fromkeys(("num_conv_pos_embeddings",), 16),
    **dict.fromkeys(("num_conv_pos_embedding_groups",), 2),
    **dict.fromkeys(("type_vocab_size",), 2),
}  # fmt: skip


# Per-stage lists (hierarchical vision models): as many stages as the default, tiny ones.
def _stages(name: str, value: list[Any]) -> list[Any] | None:
    n = len(value)
    if name in ("depths", "num_layers_per_stage", "layers", "block_repeats", "num_blocks"):
        return [1] * n
    if name in ("hidden_sizes", "embed_dims", "dims", "widths", "channels"):
        return [16 * 2 ** min(i, 2) for i in range(n)]
    if name in ("num_heads", "num_attention_heads"):
        return [1 * 2 ** min(i, 2) for i in range(n)]
    return None


# Audio feature extractors (wav2vec2 and kin): two small convolutions.
AUDIO_CONV = dict(
    conv_dim=[16, 16], conv_stride=[5, 4], conv_kernel=[10, 4], num_feat_extract_layers=2
)

# Hand overrides, on top of the generic shrink: model_type -> fields (each with why).
OVERRIDES: dict[str, dict[str, Any]] = {
    # hidden_size * expand (64) must be num_heads * head_dim
    "mamba2": dict(num_heads=4, head_dim=16),
    # the attention and expert layers come every 8th layer from the 4th and 2nd: one of each
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1
    ),
    # attention layers are listed by index, none by default (and an all-Mamba stack fails)
    "bamba": dict(attn_layer_indices=[1]),
    # 4 coordinate and 2 shape embeddings are concatenated into hidden_size (4*5 + 2*6 = 32)
    "layoutlmv3": dict(coordinate_size=5, shape_size=6),
}


# Why a type converts partly or has nothing to convert (file and line in transformers 5.24).
_XIELU = "xIELU (`hidden_act='xielu'`, `XIELUActivation`): not a family serfswap replaces"
_CLAMPED_SWIGLU = (
    "a clamped SwiGLU written out, `gate * torch.sigmoid(gate * alpha)` with alpha 1.702 "
    "(a sigmoid-approximated GELU), no activation call"
)
WHY: dict[str, str] = {
    "apertus": _XIELU,
    "apertus1p5_text": _XIELU,
    "gpt_oss": f"{_CLAMPED_SWIGLU} (`modeling_gpt_oss.py:86`)",
    "openai_privacy_filter": f"{_CLAMPED_SWIGLU} (`modeling_openai_privacy_filter.py:263`)",
    "minimax_m3_vl_text": f"{_CLAMPED_SWIGLU} (`modeling_minimax_m3_vl.py:189`)",
    "inkling2_text": "a Swish written out, `softcap(gate) * torch.sigmoid(gate) * softcap(up)` "
    "(`modeling_inkling2.py:752`, `Inkling2SoftcappedSwiGLU`), no activation call",
}
WHY["inkling2_loop_text"] = WHY["inkling2_text"]


def _token_ids(d: dict[str, Any], vocab: int) -> None:
    """Point special token ids that the shrunk vocabulary no longer holds at its last ids."""
    free = vocab - 1
    for key, value in list(d.items()):
        if (key.endswith(("_token_id", "_token_index", "_id")) and isinstance(value, int)
                and not isinstance(value, bool) and value >= vocab):  # fmt: skip
            d[key] = free
            free -= 1


# A small transformers ResNet for the detection models whose default backbone is a timm ResNet-50.
BACKBONE = dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64, 64],
                depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])  # fmt: skip
DEPTH_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers")


def _layers(value: list[Any]) -> list[Any]:
    """The first layers of a per-layer list; a hybrid (Mamba or linear attention and full
    attention) keeps one full-attention layer, last, so both kinds are built and run."""
    out = value[:LAYERS]
    full = [v for v in value if isinstance(v, str) and "attention" in v and "linear" not in v]
    if full and full[0] not in out:
        out[-1] = full[0]
    return out


def _rope(rope: dict[str, Any]) -> dict[str, Any]:
    """Multimodal rotary sections split half the head dim (8) between time, height, width;
    per-layer-type rope dicts hold one such dict each."""
    out = {k: _rope(v) if isinstance(v, dict) else v for k, v in rope.items()}
    if isinstance(out.get("mrope_section"), list):
        out["mrope_section"] = [2, 3, 3]
    return out


def _widths(d: dict[str, Any]) -> set[int]:
    """The default widths anywhere in a config tree (hidden_size, d_model... of 64 and more)."""
    found = {v for k, v in d.items() if SCALARS.get(k) == WIDTH and isinstance(v, int) and v >= 64}
    for value in d.values():
        if isinstance(value, dict):
            found |= _widths(value)
    return found


def _width_like(key: str, value: Any, widths: set[int]) -> bool:
    """A field that must equal some model's width (``codebook_dim``, ``out_hidden_size``,
    ``condition_dim``...): a size-like name whose default is one of the config's widths."""
    return (isinstance(value, int) and not isinstance(value, bool) and value in widths
            and key not in SCALARS and not key.startswith("max")
            and any(part in key for part in ("size", "dim", "hidden", "channels")))  # fmt: skip


def _mrope(d: dict[str, Any], out: dict[str, Any]) -> None:
    """Multimodal-rope models (their config class skips ``mrope_section`` when validating
    rope) split half the head dim into sections; their modeling defaults to [16, 24, 24]."""
    from transformers import CONFIG_MAPPING

    try:  # the lazy mapping's .get() answers None for every key
        cls = CONFIG_MAPPING[d.get("model_type", "")]
    except KeyError:
        return
    rope = out.get("rope_parameters")
    if "mrope_section" in getattr(cls, "ignore_keys_at_rope_validation", ()) and isinstance(
        rope, dict
    ):
        out["rope_parameters"] = {**rope, "mrope_section": [2, 3, 3]}


def shrink(d: dict[str, Any], widths: set[int] | None = None) -> dict[str, Any]:
    """The config dict ``d`` with its size fields made small; sub-configs (dicts with a
    ``model_type``) shrunk the same way."""
    widths = _widths(d) if widths is None else widths
    out = dict(d)
    depth = next((d[k] for k in DEPTH_KEYS if isinstance(d.get(k), int)), None)
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = shrink(value, widths)
        elif key in SCALARS and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, SCALARS[key]) if key.startswith("max") else SCALARS[key]
        elif _width_like(key, value, widths):
            out[key] = WIDTH
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            small = _stages(key, value)
            if small is not None:
                out[key] = small
        if isinstance(value, list) and out[key] is value and depth and len(value) == depth > LAYERS:
            out[key] = _layers(value)  # per-layer lists (layer_types...) follow the depth
        if key in ("attn_layer_indices", "attention_layer_indices") and isinstance(value, list):
            out[key] = [LAYERS - 1]  # hybrids: the last of the small layers is attention
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            out[key] = {k: v for k, v in value.items() if int(k) < LAYERS}  # per-layer settings
        if key in ("rope_parameters", "rope_scaling") and isinstance(value, dict):
            out[key] = _rope(value)
    _mrope(d, out)
    for key in ("out_features", "out_indices"):
        if key in out and "stage_names" in out:
            out[key] = None
    if "backbone_config" in out and out.get("use_timm_backbone"):
        out.update(backbone=None, backbone_config=dict(BACKBONE))
    if "conv_dim" in out and isinstance(out["conv_dim"], list | tuple):
        out.update(AUDIO_CONV)
    for key in ("use_pretrained_backbone", "use_timm_backbone"):
        if key in out:
            out[key] = False
    if isinstance(out.get("vocab_size"), int):
        _token_ids(out, out["vocab_size"])
    return out


def types() -> list[str]:
    """Every model type transformers registers, less those ``hf_zoo`` configures by hand."""
    from transformers import CONFIG_MAPPING

    from .hf_zoo import MODELS

    return sorted(t for t in CONFIG_MAPPING if t not in MODELS)


def config(model_type: str) -> Any:
    """The type's default config, shrunk, rebuilt from its dict so derived fields follow."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = shrink(cls().to_dict())
    d.update(OVERRIDES.get(model_type, {}))
    for key in ("model_type", "transformers_version", "architectures"):
        d.pop(key, None)
    return cls(**d)


def model_class(cfg: Any) -> type[nn.Module]:
    """``AutoModel``'s class for the config, else any auto mapping's, else the class in the
    type's modeling module whose ``config_class`` is the config's (sub-configs: ``*TextModel``)."""
    from transformers.models.auto import modeling_auto

    model_type = cfg.model_type
    mappings = [modeling_auto.MODEL_MAPPING_NAMES] + [
        v for k, v in vars(modeling_auto).items()
        if k.startswith("MODEL_") and k.endswith("_MAPPING_NAMES") and isinstance(v, dict)
    ]  # fmt: skip
    import transformers

    for mapping in mappings:
        name = mapping.get(model_type)
        if isinstance(name, tuple | list):
            name = name[0]
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    module = importlib.import_module(type(cfg).__module__.replace("configuration_", "modeling_"))
    with_config = [
        obj for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
        and getattr(obj, "config_class", None) is type(cfg) and name.endswith("Model")
        and "PreTrained" not in name
    ]  # fmt: skip
    if not with_config:
        raise LookupError(f"no model class for config {type(cfg).__name__}")
    return min(with_config, key=lambda c: len(c.__name__))


def params_on_meta(model_type: str) -> int:
    """The small build's parameter count, from a model made on the meta device (no memory,
    no init): the sweep skips types over :data:`MAX_PARAMS` without building them."""
    cfg = config(model_type)
    with torch.device("meta"):
        model = model_class(cfg)._from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = config(model_type)
    cls = model_class(cfg)
    try:
        model = cls._from_config(cfg, attn_implementation="eager")
    except (ValueError, TypeError):  # a few refuse "eager" by name; they get their default
        model = cls._from_config(cfg)
    return model.eval()


def inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``example_inputs_for`` infers, with token ids kept clear of the special ids that
    the shrunk config moved to the end of the vocabulary."""
    from serfswap.inputs import example_inputs_for

    torch.manual_seed(0)
    found = example_inputs_for(model, batch=2, seq=8)
    if "input_ids" in found:
        found["input_ids"] = torch.randint(3, VOCAB - 32, found["input_ids"].shape)
    return found


def runnable_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`inputs`, or, when the model refuses them all together, its text inputs alone:
    image-text models want as many image tokens in ``input_ids`` as their vision tower makes
    features, which only their processor knows. The first error is raised if neither runs."""
    found = inputs(model)
    try:
        with torch.no_grad():
            model(**found)
        return found
    except Exception:
        text = {k: v for k, v in found.items() if k in ("input_ids", "attention_mask")}
        if "input_ids" not in text or text == found:
            raise
        with torch.no_grad():
            model(**text)
        return text


RESULTS_PATH = Path(__file__).with_name("hf_all.jsonl")


def results() -> dict[str, dict[str, Any]]:
    """The sweep's last record per type (``benchmarks/hf_zoo_sweep.py`` writes them)."""
    if not RESULTS_PATH.exists():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for line in RESULTS_PATH.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["type"]] = row
    return out


# The statuses a type can have; the test runs the first three.
TESTED_STATUSES = ("full", "partial", "nothing")
# The slow test's share of CI: types are taken, cheapest first, until their recorded CPU time in
# the sweep (build, forward, convert with the audit; one thread) reaches this; the rest are left
# to the sweep (docs/models.md says which).
TEST_BUDGET_S = 60.0


def cost(row: dict[str, Any]) -> float:
    """CPU seconds the sweep's child spent on the type (one thread; wall time on a shared
    machine says more about the others' load)."""
    return row.get("cpu_s") or 0.0


def tested(recorded: dict[str, dict[str, Any]]) -> list[str]:
    """The types ``tests/test_zoo_hf_all.py`` converts: those that run, within the budget."""
    runnable = sorted(
        (t for t, row in recorded.items() if row["status"] in TESTED_STATUSES),
        key=lambda t: (cost(recorded[t]), t),
    )
    out, spent = [], 0.0
    for t in runnable:
        spent += cost(recorded[t])
        if spent > TEST_BUDGET_S:
            break
        out.append(t)
    return sorted(out)


def site_key(site: Any) -> tuple[str, str, str]:
    """What identifies a left site across runs: its module, where it ran, what it was."""
    if isinstance(site, dict):
        return (site["name"], site["where"], site["source"])
    return (site.name, site.where, site.source)
