"""The options of the command line and the API that are plain values: choices, defaults and
their checks, importable without torch.

``serfswap`` parses and checks its arguments before it imports torch (seconds), so that a typo
is answered at once; the modules that do the work import these names from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ExportError, InvalidArgumentError

# Export ---------------------------------------------------------------------------------------

DEFAULT_OPSET = 20
DEFAULT_DTYPE = "fp32"
DTYPE_NAMES = ("fp32", "fp16")  # export.request.DTYPES maps them to torch dtypes
# Default tolerances of the verification, per export dtype: measured on the zoo, with margin.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}  # (atol, rtol)
# export_onnx(quantize=) / --quantize: each mode -> per-channel int8 weights (serfswap/export/
# quantize.py says why per-channel is the default).
QUANTIZE = {"int8": True, "int8-per-tensor": False}
# The opsets the exporter writes as asked, measured on torch 2.14 + onnxruntime 1.32: 18 is the
# lowest it implements; below, it converts down after export and quietly keeps 18 where that
# fails (17 failed on timm's test_resnet, 16 and lower on a Linear+GELU), and 26 fails to
# convert. The opset actually written is read back from the file, so drift is caught too.
# The translation of Serf (serfswap.onnx_ops.translation) is written in the lowest one's ops.
OPSETS = range(18, 26)


def check_opset(opset: object) -> int:
    """``opset`` when the exporter can write it, else ExportError (a usage error)."""
    if type(opset) is not int or opset not in OPSETS:
        raise ExportError(
            f"opset {opset!r} is not supported: use {OPSETS.start} to {OPSETS.stop - 1} "
            "(lower opsets cannot express what the exporter writes)",
            option="opset",
        )
    return opset


# torch's two ONNX exporters: "auto" tries the dynamo exporter (torch.export), then, when every
# shape plan fails there, TorchScript's (torch.jit.trace), which gets past what torch.export
# cannot decompose (non-contiguous views in MaxViT and ViT-relpos, 5-D attention in Hiera).
EXPORTERS = ("auto", "dynamo", "torchscript")

# Tasks of export_onnx: the model's forward without its KV cache; a transformers decoder with
# its cache in Optimum's layout (serfswap.export.decoder); an encoder-decoder as Optimum's folder
# of three files, encoder, decoder and decoder with past (serfswap.export.seq2seq).
DEFAULT_TASK = "default"
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
SEQ2SEQ_TASKS = ("text2text-generation-with-past", "automatic-speech-recognition-with-past")
TASKS = (DEFAULT_TASK, TEXT_GENERATION_WITH_PAST, *SEQ2SEQ_TASKS)


# Recovery -------------------------------------------------------------------------------------

OUTPUT_LOSSES = ("auto", "kl", "mse-cosine")
TRAIN_CHOICES = ("all", "converted")
AUTOCAST_CHOICES = (None, "bf16")
TEACHER_DTYPES = (None, "bf16")  # None: the teacher as given (sharded with fsdp)


def _cli(help: str, **argparse_keywords: Any) -> Any:
    """A field the ``recover`` command offers as ``--name``: its help (``%(default)s`` is the
    field's default) and what argparse needs beyond the field's type and default."""
    return {"help": help, "argparse": argparse_keywords}


# The peak learning rate when none is given, by the kind of model (distill.task_kind), measured
# on all-MiniLM-L6-v2, the digits CNN and the small LLaMA (benchmarks/RESULTS.md, issue 29):
# after the fit an embedding model starts close to its original, and 1e-4 takes it further
# away for its first hundred steps; 2e-5 does not (cosine 0.9986, neighbours 0.961 at 300
# steps against 0.9967, 0.883). The others end the same at 1e-4 and below.
LR_BY_KIND = {"embedding": 2e-5, "classifier": 1e-4, "causal-lm": 1e-4}
DEFAULT_LR = 1e-4


@dataclass(frozen=True)
class RecoveryOptions:
    """The options of :func:`recover`, checked when made.

    Optimisation: ``lr`` (None: by the kind of model, :data:`LR_BY_KIND`, known at the first
    step from the original's outputs), ``weight_decay`` (AdamW), ``warmup`` (fraction of the
    steps of linear warmup before the cosine decay), ``clip`` (gradient norm).
    Losses: ``output_loss`` (``"kl"`` for logits, ``"mse-cosine"`` for embeddings and hidden
    states, ``"auto"`` picks by output), ``temperature`` (of the KL), ``output_weight``,
    ``layer_weight`` (matching the outputs of the modules that hold converted activations; 0
    turns it off), ``task_weight`` (cross-entropy when batches carry labels),
    ``relational_weight`` and ``relational_temperature`` (embedding models, the
    ``"mse-cosine"`` outputs: KL between the student's and the teacher's softmax over each
    example's cosine similarities to the others in the batch, at that temperature: the ranking
    that nearest-neighbour search reads; see ``serfswap.recovery.relational``).
    Ingredients: ``fit_batches`` (calibration batches on which each converted Serf is fitted
    to the activation it replaced, ``a * Serf(b * x)``, with ``a`` and ``b`` folded into the
    neighbouring layers' weights before the first step; 0: off; see
    ``serfswap.recovery.fit``; not with ``blend``), ``blend`` (fraction of the
    steps over which converted activations ramp from the original to Serf; 0: off),
    ``bn_batches`` (batches to re-estimate BatchNorm statistics
    on first; 0: off), ``train_mode`` (run the student in train mode, with dropout and batch
    statistics; off by default: the student learns the function the eval-mode teacher computes,
    without noise that only blurs what there is to copy).
    Cost: ``train`` (``"all"`` parameters, or only those of the ``"converted"`` modules, the
    ones that hold the new activations), ``autocast`` (``"bf16"``: forward passes under
    bfloat16 autocast).
    Bookkeeping: ``seed``, ``eval_every`` (steps between held-out evaluations; 0: only before
    and after), ``checkpoint_dir`` with ``checkpoint_every`` (steps) and ``keep`` (how many to
    keep), ``resume`` (continue from the newest checkpoint in ``checkpoint_dir``, or extend a
    finished run there to more ``steps``), ``log`` (a JSON-lines file, one line per step),
    ``plot`` (a PNG of the curves; needs matplotlib), ``progress`` (a tqdm bar, when tqdm is
    installed; the slow steps before it are logged at INFO on the ``serfswap`` logger).
    Scale (``serfswap.recovery.fsdp``): ``fsdp`` (under torchrun, the student and the teacher
    sharded over the ranks per block with FSDP2), ``fsdp_bf16`` (bfloat16 parameters in the
    passes, float32 reductions), ``activation_checkpointing`` (per block, with ``fsdp``),
    ``teacher_dtype`` (``"bf16"``: the teacher cast to bfloat16 in place and kept whole on each
    process, not sharded; its outputs cast to float32 for the losses).
    """

    # The length of a run where none is given (the demo's), and the share of it between
    # evaluations and checkpoints by default: see :meth:`every`.
    STEPS: ClassVar[int] = 300

    # Fields with metadata are the ``recover`` command's options, generated from them.
    lr: float | None = field(
        default=None,
        metadata=_cli(
            "peak learning rate (AdamW; warmup, then cosine decay to 0; default: 1e-4, and 2e-5 "
            "for embedding models)",
            type=float,
        ),
    )
    weight_decay: float = 0.01
    warmup: float = field(
        default=0.1, metadata=_cli("fraction of the steps of linear warmup (default: %(default)s)")
    )
    clip: float = 1.0
    output_loss: str = "auto"
    temperature: float = 2.0
    output_weight: float = 1.0
    layer_weight: float = 1.0
    task_weight: float = 1.0
    relational_weight: float = field(
        default=0.0,
        metadata=_cli(
            "embedding models: weight of the in-batch similarity-ranking term (KL between the "
            "student's and the original's softmax over each example's cosines to the others; "
            "0: off; default: %(default)s)"
        ),
    )
    relational_temperature: float = field(
        default=0.05,
        metadata=_cli(
            "temperature of that softmax (low: the nearest neighbours dominate; default: "
            "%(default)s)"
        ),
    )
    blend: float = field(
        default=0.0,
        metadata=_cli(
            "fraction of the steps over which each Serf ramps from the original activation "
            "(0: off; default: %(default)s)"
        ),
    )
    fit_batches: int = field(
        default=4,
        metadata=_cli(
            "batches to fit each Serf to the activation it replaced on first, as a * Serf(b * x) "
            "with a and b folded into the neighbouring layers (0: off; default: %(default)s)"
        ),
    )
    bn_batches: int = field(
        default=20,
        metadata=_cli(
            "batches to re-estimate BatchNorm statistics on first, for models with BatchNorm "
            "(0: off; default: %(default)s)"
        ),
    )
    train_mode: bool = False
    train: str = field(
        default="all",
        metadata=_cli(
            "train all parameters, or only the converted modules'", choices=TRAIN_CHOICES
        ),
    )
    autocast: str | None = field(
        default=None, metadata=_cli("bfloat16 autocast", choices=[c for c in AUTOCAST_CHOICES if c])
    )
    seed: int = field(default=0, metadata=_cli("default: %(default)s"))
    eval_every: int = field(
        default=0,
        metadata=_cli(
            "steps between held-out evaluations (default: steps / 10; 0: only before and after)",
            default=None,
        ),
    )
    checkpoint_dir: str | Path | None = field(
        default=None, metadata=_cli("default: OUT.checkpoints next to OUT")
    )
    checkpoint_every: int = field(
        default=0, metadata=_cli("steps (default: steps / 10; 0: no checkpoints)", default=None)
    )
    keep: int = field(
        default=2, metadata=_cli("checkpoints kept while the run goes (default: %(default)s)")
    )
    resume: bool = field(
        default=False,
        metadata=_cli(
            "continue from the last checkpoint (exactly), or extend a finished run to more --steps"
        ),
    )
    log: str | Path | None = field(
        default=None, metadata=_cli("a JSON-lines file, one line per step")
    )
    plot: str | Path | None = field(
        default=None,
        metadata=_cli(
            "write the curves as a PNG (default name: OUT.curves.png)", nargs="?", const=""
        ),
    )
    progress: bool = True
    fsdp: bool = field(
        default=False,
        metadata=_cli(
            "under torchrun, shard the student (weights, gradients, AdamW moments) and the "
            "teacher over the ranks per block with FSDP2, instead of a whole copy on each"
        ),
    )
    fsdp_bf16: bool = field(
        default=False,
        metadata=_cli(
            "with --fsdp: bfloat16 parameters in the forward and backward, float32 gradient "
            "reductions and master weights"
        ),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_cli("with --fsdp: recompute each block's activations in the backward"),
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata=_cli(
            "keep the teacher whole in bfloat16 on each process (its outputs cast to float32 "
            "for the losses) instead of sharding it with --fsdp: 2 bytes a parameter per "
            "process instead of 4 / ranks, and no gathers for its forward",
            choices=[c for c in TEACHER_DTYPES if c],
        ),
    )

    @staticmethod
    def every(steps: int) -> int:
        """The default steps between evaluations and between checkpoints of a ``steps`` run
        where the caller asks for them without saying how often: a tenth of the run."""
        return max(1, steps // 10)

    def __post_init__(self) -> None:
        choices = {"output_loss": OUTPUT_LOSSES, "train": TRAIN_CHOICES,
                   "autocast": AUTOCAST_CHOICES, "teacher_dtype": TEACHER_DTYPES}  # fmt: skip
        for name, allowed in choices.items():
            self._check(name, getattr(self, name) in allowed, f"use one of {allowed}")
        for name in ("warmup", "blend"):
            self._check(name, 0 <= getattr(self, name) <= 1, "a fraction of steps")
        self._check("lr", self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                    "must be positive")  # fmt: skip
        for name in ("temperature", "clip", "relational_temperature"):
            self._check(name, getattr(self, name) > 0 and math.isfinite(getattr(self, name)),
                        "must be positive")  # fmt: skip
        self._check("relational_weight", 0 <= self.relational_weight < math.inf,
                    "a weight >= 0 (0: off)")  # fmt: skip
        for name in ("fit_batches", "bn_batches", "eval_every", "checkpoint_every"):
            self._check(name, getattr(self, name) >= 0, "must be >= 0")
        self._check("keep", self.keep >= 1, "keep at least one checkpoint")
        for name in ("fsdp_bf16", "activation_checkpointing"):
            self._check(name, self.fsdp or not getattr(self, name), "needs fsdp=True")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise InvalidArgumentError(
                "checkpoint_every and resume need a checkpoint_dir", option="checkpoint_dir"
            )

    def _check(self, name: str, ok: bool, why: str) -> None:
        """InvalidArgumentError naming the option, ``name=value: why``, unless ``ok``."""
        if not ok:
            raise InvalidArgumentError(
                "{%s}: %s" % (name, why.replace("{", "{{").replace("}", "}}")),  # noqa: UP031
                option=name,
                **{name: getattr(self, name)},
            )
