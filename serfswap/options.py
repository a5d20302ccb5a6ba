"""The options of the command line and the API that are plain values: choices, defaults and
their checks, importable without torch.

``serfswap`` parses and checks its arguments before it imports torch (seconds), so that a typo
is answered at once; the modules that do the work import these names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError, InvalidArgumentError

# Export ---------------------------------------------------------------------------------------

DEFAULT_OPSET = 20
DEFAULT_DTYPE = "fp32"
DTYPE_NAMES = ("fp32", "fp16")  # export.DTYPES maps them to torch dtypes
# Default tolerances of the verification, per export dtype: measured on the zoo, with margin.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}  # (atol, rtol)
# The opsets the exporter writes as asked, measured on torch 2.14 + onnxruntime 1.32: 18 is the
# lowest it implements; below, it converts down after export and quietly keeps 18 where that
# fails (17 failed on timm's test_resnet, 16 and lower on a Linear+GELU), and 26 fails to
# convert. The opset actually written is read back from the file, so drift is caught too.
OPSETS = range(18, 26)


def check_opset(opset: object) -> int:
    """``opset`` when the exporter can write it, else ExportError (a usage error)."""
    if type(opset) is not int or opset not in OPSETS:
        raise ExportError(
            f"opset {opset!r} is not supported: use {OPSETS.start} to {OPSETS.stop - 1} "
            "(lower opsets cannot express what the exporter writes)"
        )
    return opset


# torch's two ONNX exporters: "auto" tries the dynamo exporter (torch.export), then, when every
# shape plan fails there, TorchScript's (torch.jit.trace), which gets past what torch.export
# cannot decompose (non-contiguous views in MaxViT and ViT-relpos, 5-D attention in Hiera).
EXPORTERS = ("auto", "dynamo", "torchscript")

# Tasks of export_onnx (see serfswap.export.decoder and serfswap.export.seq2seq); the seq2seq
# ones write a folder of three files (Optimum's layout), the others one file
SEQ2SEQ_TASKS = ("text2text-generation-with-past", "automatic-speech-recognition-with-past")
TASKS = ("default", "text-generation-with-past", *SEQ2SEQ_TASKS)


# Recovery -------------------------------------------------------------------------------------

OUTPUT_LOSSES = ("auto", "kl", "mse-cosine")
TRAIN_CHOICES = ("all", "converted")
AUTOCAST_CHOICES = (None, "bf16")


@dataclass(frozen=True)
class RecoveryOptions:
    """The options of :func:`recover`, checked when made.

    Optimisation: ``lr``, ``weight_decay`` (AdamW), ``warmup`` (fraction of the steps of
    linear warmup before the cosine decay), ``clip`` (gradient norm).
    Losses: ``output_loss`` (``"kl"`` for logits, ``"mse-cosine"`` for embeddings and hidden
    states, ``"auto"`` picks by output), ``temperature`` (of the KL), ``output_weight``,
    ``layer_weight`` (matching the outputs of the modules that hold converted activations; 0
    turns it off), ``task_weight`` (cross-entropy when batches carry labels).
    Ingredients: ``blend`` (fraction of the steps over which converted activations ramp from
    the original to Serf; 0: off), ``bn_batches`` (batches to re-estimate BatchNorm statistics
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
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    clip: float = 1.0
    output_loss: str = "auto"
    temperature: float = 2.0
    output_weight: float = 1.0
    layer_weight: float = 1.0
    task_weight: float = 1.0
    blend: float = 0.0
    bn_batches: int = 20
    train_mode: bool = False
    train: str = "all"
    autocast: str | None = None
    seed: int = 0
    eval_every: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    keep: int = 2
    resume: bool = False
    log: str | Path | None = None
    plot: str | Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {"output_loss": OUTPUT_LOSSES, "train": TRAIN_CHOICES,
                   "autocast": AUTOCAST_CHOICES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r}: use one of {allowed}")
        for name in ("warmup", "blend"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidArgumentError(f"{name}={getattr(self, name)}: a fraction of steps")
        if self.lr <= 0 or self.temperature <= 0 or self.clip <= 0:
            raise InvalidArgumentError("lr, temperature and clip must be positive")
        for name in ("bn_batches", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.keep < 1:
            raise InvalidArgumentError(f"keep={self.keep}: keep at least one checkpoint")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise InvalidArgumentError("checkpoint_every and resume need a checkpoint_dir")
