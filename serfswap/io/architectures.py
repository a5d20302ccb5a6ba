"""Architectures, built without running code from files: a timm name (shaped like the weights
it will hold), a HuggingFace config (transformers' own classes; a folder's code only when
trusted), :func:`describe` (how to rebuild a model: what a checkpoint stores) and the
comparison of weights with an architecture built on the meta device (sizes, no memory)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, ModelSpecError, first_line
from ..rewrite.configs import config_before
from ..rewrite.convert import REPORT_ATTR
from .formats import mismatch, shapes_of
from .paths import check_input_path
from .remote_code import never_ask, refuse_remote_code

# arch["head"] of a checkpoint of a transformers model with its language-model head; absent for
# the bare model (AutoModel), as in every checkpoint written before the field existed.
CAUSAL_LM = "causal-lm"


@dataclass
class Loaded:
    """A loaded model and what is known of how to rebuild it (for ``serfswap convert``)."""

    model: nn.Module | torch.export.ExportedProgram
    source: str
    arch: dict[str, Any] | None = (
        None  # {"kind": "timm", "name": ..., ...} or {"kind": "hf", "config": {...}}
    )
    notes: list[str] = field(default_factory=list)  # worth one line to the user


def _timm(name: str, **kwargs: Any) -> nn.Module:
    """timm's ``name`` with seeded random weights: two runs on ``timm:NAME`` agree."""
    import timm

    if not timm.is_model(name):
        raise ModelSpecError(f"unknown timm architecture {name!r} (see timm.list_models())")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:  # a keyword the architecture does not take
            raise ModelSpecError(f"timm {name}: {exc} (check --model-kwargs)") from None


def _listify(value: Any) -> list[str]:
    """A pretrained_cfg entry that is one name or several, as a list."""
    return [value] if isinstance(value, str) else list(value or [])


def _timm_shapes(
    name: str, state: dict[str, torch.Tensor], given: dict[str, Any]
) -> dict[str, Any]:
    """The keywords that shape timm's ``name`` like the weights in ``state``: ``num_classes``
    from the classifier's weight (0 when the weights have no classifier), ``in_chans`` from
    the first convolution's, unless ``given`` sets them. A fine-tuned head loads as it is."""
    with torch.device("meta"):  # the default model, for its config only: allocates nothing
        cfg = _timm(name, **given).pretrained_cfg
    shapes = dict(given)
    heads = _listify(cfg.get("classifier"))
    if "num_classes" not in given and heads:
        weights = [state[f"{h}.weight"] for h in heads if f"{h}.weight" in state]
        if weights:
            shapes["num_classes"] = int(weights[0].shape[0])
        elif not any(k.startswith(f"{h}.") for h in heads for k in state):
            shapes["num_classes"] = 0  # features only
    convs = [state.get(f"{c}.weight") for c in _listify(cfg.get("first_conv"))]
    if "in_chans" not in given and convs and convs[0] is not None and convs[0].dim() == 4:
        shapes["in_chans"] = int(convs[0].shape[1])
    return shapes


def timm_arch(name: str, state: dict[str, torch.Tensor] | None = None,
              **given: Any) -> Loaded:  # fmt: skip
    """timm's ``name`` shaped for ``state`` (see :func:`_timm_shapes`), its weights loaded.
    Without ``state`` its weights are random (seeded) and :attr:`Loaded.notes` says so."""
    kwargs = _timm_shapes(name, state, given) if state is not None else dict(given)
    model = _timm(name, **kwargs)
    extra = {k: v for k, v in kwargs.items() if k != "num_classes"}
    arch = {"kind": "timm", "name": name, "num_classes": model.num_classes,
            **({"kwargs": extra} if extra else {})}  # fmt: skip
    loaded = Loaded(model, f"timm:{name}", arch)
    # Read from the weights and unlike the architecture's default (a fine-tuned head, a
    # grayscale stem): said, since nothing else shows the user what shape was built.
    cfg = model.pretrained_cfg
    defaults = {
        "num_classes": cfg.get("num_classes", 1000),
        "in_chans": cfg.get("input_size", (3,))[0],
    }
    inferred = {
        k: v for k, v in kwargs.items() if k in defaults and k not in given and v != defaults[k]
    }
    if inferred:
        loaded.notes.append(
            f"timm:{name} shaped like its weights: "
            + ", ".join(f"{k}={v}" for k, v in sorted(inferred.items()))
            + " (--num-classes / --model-kwargs set them)"
        )
    if state is None:
        loaded.notes.append(
            f"timm:{name} has random weights here (seeded, so runs agree); "
            "pass --weights FILE for trained ones"
        )
    return loaded


def hf_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a HuggingFace model directory, checked to be an object."""
    if not directory.is_dir():
        raise ModelSpecError(f"{directory} is not a directory")
    file = directory / "config.json"
    if not file.is_file():
        raise ModelSpecError(f"{directory} has no config.json: not a HuggingFace model directory")
    check_input_path(file)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file}: a JSON {type(config).__name__}, not an object")
    return config


def needs_remote_code(config: dict[str, Any], where: str, trust_remote_code: bool) -> bool:
    """Whether only code shipped with the model can build it; refused unless trusted.

    Untrusted, a remote-code key anywhere below the top level (a sub-config such as DETR's
    ``backbone_config``, a list of configs) is refused: transformers loads sub-configs without
    the caller's ``trust_remote_code`` and would ask on stdin. A top-level ``auto_map`` of a
    type transformers knows is ignored, since serfswap passes ``trust_remote_code=False``.
    """
    from transformers import CONFIG_MAPPING

    never_ask()
    if not trust_remote_code:
        refuse_remote_code(config, where, skip_top=frozenset({"auto_map"}))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{where}: the config names no model_type (a string)")
    if model_type in CONFIG_MAPPING:
        return False  # transformers' own class; an auto_map is ignored without trust
    if "auto_map" not in config:
        raise ModelLoadError(f"{where}: transformers knows no model_type {model_type!r}")
    if not trust_remote_code:
        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is defined by code in the model's folder "
            "(auto_map); loading it runs that code. If you trust it, pass --trust-remote-code"
        )
    return True


def _hf_from_config(config_dict: dict[str, Any], *, causal_lm: bool = False) -> nn.Module:
    """A transformers model of a registered type from a config dict (random weights); with
    ``causal_lm``, the model with its language-model head (``AutoModelForCausalLM``)."""
    import transformers

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        return auto.from_config(config, attn_implementation="eager", trust_remote_code=False)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(
            f"the {model_type} config cannot build a model: {first_line(exc)}"
        ) from None


def build_arch(
    arch: str,
    *,
    trust_remote_code: bool = False,
    state: dict[str, torch.Tensor] | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Loaded:
    """``timm:NAME`` (shaped for ``state`` when given) or ``hf:DIR`` (the directory's config
    only), with random weights."""
    kind, _, name = arch.partition(":")
    if kind == "timm" and name:
        return timm_arch(name, state, **(timm_kwargs or {}))
    if timm_kwargs:
        raise ModelSpecError("--num-classes and --model-kwargs shape timm architectures only")
    if kind == "hf" and name:
        directory = Path(name)
        config = hf_config(directory)
        if needs_remote_code(config, name, trust_remote_code):
            import transformers

            remote = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
            model = transformers.AutoModel.from_config(remote, trust_remote_code=True)
            return Loaded(model, arch, None)  # its code is not in a checkpoint: not describable
        lm = _keeps_lm_head(config, state)
        if state is not None:  # compare on the meta device first: a huge vocab_size allocates
            _compare_on_meta(config, state, name, causal_lm=lm)  # nothing before it is refused
        head = {"head": CAUSAL_LM} if lm else {}
        return Loaded(_hf_from_config(config, causal_lm=lm), arch,
                      {"kind": "hf", "config": config, **head})  # fmt: skip
    raise ModelSpecError(f"--arch {arch!r}: use timm:NAME or hf:DIR")


def _compare_on_meta(
    config: dict[str, Any], state: dict[str, torch.Tensor], where: str, *, causal_lm: bool
) -> None:
    """Refuse weights whose names or shapes differ from the model ``config`` describes (with
    its LM head when ``causal_lm``), built on the meta device (sizes only, no memory)."""
    with torch.device("meta"):
        skeleton = _hf_from_config(config, causal_lm=causal_lm)
    problem = mismatch(shapes_of(skeleton), {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ModelLoadError(f"the weights do not match the architecture in {where}: {problem}")


def rebuild(arch: dict[str, Any]) -> nn.Module:
    """The model a checked ``arch`` (see :func:`_checked_arch`) describes, with random weights."""
    if arch["kind"] == "timm":
        return _timm(arch["name"], num_classes=arch.get("num_classes", 1000),
                     **arch.get("kwargs", {}))  # fmt: skip
    return _hf_from_config(arch["config"], causal_lm=arch.get("head") == CAUSAL_LM)


def describe(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild ``model`` without pickles: a timm name, or a HuggingFace config."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return {"kind": "timm", "name": cfg["architecture"], "num_classes": model.num_classes}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # The config before convert() said "serf" in it: the checkpoint's swap redoes that.
        config_dict = config_before(config, model.__dict__.get(REPORT_ATTR))
        kind = type(model)
        # FSDP2 (fully_shard) swaps a sharded module's class for a subclass: describe its own.
        kind = kind.__mro__[getattr(kind, "_orig_cls_mro_index", 0)]
        lm = kind.__module__.startswith("transformers.") and kind.__name__ in _causal_lm_classes()
        head = {"head": CAUSAL_LM} if lm else {}
        return {"kind": "hf", "config": config_dict, **head}
    return None


def _causal_lm_classes() -> set[str]:
    """The names of transformers' causal-LM classes (``LlamaForCausalLM``...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as lms

    return {n for v in lms.values() for n in ((v,) if isinstance(v, str) else v)}


def saved_as_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json names a causal-LM class."""
    return bool(_causal_lm_classes() & set(config.get("architectures") or []))


def seq2seq_lm_auto(config: dict[str, Any]) -> Any:
    """The auto class of a folder saved from an encoder-decoder with its language-model head
    (``T5ForConditionalGeneration``, ``WhisperForConditionalGeneration``...), else None: the
    head is kept, as a causal LM's is, so that the model exports with a seq2seq task."""
    import transformers
    from transformers.models.auto import modeling_auto

    saved = set(config.get("architectures") or [])
    for mapping, auto in (
        (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
        (modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, "AutoModelForSpeechSeq2Seq"),
    ):
        if saved & set(mapping.values()):
            return getattr(transformers, auto)
    return None


def _keeps_lm_head(config: dict[str, Any], state: dict[str, torch.Tensor] | None) -> bool:
    """Whether ``--arch hf:DIR`` builds the language-model head: the folder was saved from a
    causal LM, and the weights (when given) are not exactly the bare model's (a state dict of
    ``AutoModel`` loads into ``AutoModel``)."""
    if not saved_as_causal_lm(config):
        return False
    if state is None:
        return True
    with torch.device("meta"):
        bare = _hf_from_config(config)
    return set(state) != set(bare.state_dict())
