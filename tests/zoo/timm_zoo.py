"""The timm models the zoo test builds: every ``test_*`` architecture, and one model per family
(timm module), the smallest that builds. Families left out, and why, are listed below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TEST_MODELS = [
    "test_byobnet", "test_coatnet", "test_convnext", "test_convnext2", "test_convnext3",
    "test_efficientnet", "test_efficientnet_evos", "test_efficientnet_gn", "test_efficientnet_ln",
    "test_mambaout", "test_maxvit", "test_nfnet", "test_resnet", "test_vit", "test_vit2",
    "test_vit3", "test_vit4", "test_vit_relpos",
]  # fmt: skip

FAMILIES = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet26t",
    "byobnet": "resnet51q",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_1024_20_ks9_p14",
    "convnext": "convnext_atto",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "cspnet": "cspresnet50",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla34",
    "dpn": "dpn68",
    "edgenext": "edgenext_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "efficientnet_b0",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "eva02_tiny_patch14_224",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_lrf",
    "gcvit": "gcvit_tiny",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnet_tiny",
    "hiera": "hiera_tiny_224",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128",
    "lowformer": "lowformer_b0",
    "mambaout": "mambaout_femto",
    "maxxvit": "maxvit_pico_rw_256",
    "metaformer": "poolformer_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "nf_regnet_b0",
    "pit": "pit_xs_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_004_tv",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2net50_14w_8s",
    "resnest": "resnest26d",
    "resnet": "resnet18",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42b",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "vit_tiny_patch16_224",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "vit_relpos_small_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "vovnet39a",
    "xception": "legacy_xception",
    "xception_aligned": "xception41",
    "xcit": "xcit_nano_12_p8_224",
}

# Input size overrides for models that take any size, to keep the zoo inside CI's time budget.
INPUT_SIZE = {
    "nasnetalarge": 96,
    "pnasnet5large": 96,
    "inception_resnet_v2": 160,
    "inception_v4": 160,
    "inception_v3": 160,
    "legacy_xception": 160,
    "xception41": 160,
}

# Families without a model small enough for CI's 2 CPU cores (each has no variant under
# ~150M parameters or below 512x512 input): not in the zoo, said here and in docs/models.md.
LEFT_OUT = {
    "deepseek_vit": "smallest model 412M parameters at 546x546",
    "gemma4_vit": "smallest model 167M parameters at 768x768",
    "mobilenetv5": "smallest model 294M parameters at 768x768",
    "qwen3_vit": "smallest model 87M parameters at 768x768",
    "naflexvit": "smallest model 87M parameters at 384x384",
    "vision_transformer_sam": "smallest model 90M parameters at 1024x1024",
    "hieradet_sam2": "smallest model at 896x896",
    "csatv2": "only model at 512x512",
}

# Models whose ONNX export (converted with the defaults for every family, exported with
# export_onnx's defaults) fails, as measured: name -> (regex of the error, reason). The slow job
# checks that each still fails this way (a fixed one must leave the table); docs/models.md shows
# it.
# Empty since the 2026-12-05 sweep: the eight models the dynamo exporter cannot export (MaxViT
# and ViT-relpos views, 5-D attention in Hiera, NesT and Twins) export through the TorchScript
# fallback, and inception_v3 and visformer_tiny (untrained outputs of 1e3 to 2e11) verify since
# the tolerance scales with each output's magnitude.
EXPORT_FAILURES: dict[str, tuple[str, str]] = {}

# Families whose model the slow job exports too (test_timm_export): the six that only the
# TorchScript fallback exports (non-contiguous views: MaxViT, ViT-relpos, BEiT; 5-D attention:
# Hiera, NesT, Twins), so that the fallback stays measured in CI with test_maxvit and
# test_vit_relpos. (EfficientViT MIT: tests/rewrite/test_efficientvit.py.)
EXPORTED_IN_CI = [
    "maxvit_pico_rw_256", "vit_relpos_small_patch16_224", "beit_base_patch16_224",
    "hiera_tiny_224", "nest_tiny", "twins_svt_small",
]  # fmt: skip

# The per-family export sweep, run by hand (benchmarks/zoo_export_sweep.py: CI exports the test_*
# models and EXPORTED_IN_CI only); its JSON lines are committed, and the counts in docs/models.md
# come from them.
SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo_export_sweep.jsonl"


def sweep_results(path: Path = SWEEP) -> dict[str, dict[str, Any]]:
    """The sweep's last row per model name (a resumed or retried sweep appends rows)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["name"]] = row
    return rows


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A fresh, seeded model and its example input (batch 1, the zoo's input size). timm and
    torch are imported here, so that the tables above cost nothing to import (the docs tables)."""
    import timm
    import torch

    torch.manual_seed(0)
    # num_classes=0: pooled features; several families zero-initialise their classifier.
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _, height, width = model.pretrained_cfg["input_size"]
    if name in INPUT_SIZE:
        height = width = INPUT_SIZE[name]
    return model, {"x": torch.randn(1, 3, height, width)}
