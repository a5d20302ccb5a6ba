"""serfswap::serf on CUDA: the fused Triton kernels behind the op, on a real GPU.

The same comparisons with the CPU op as tests/ops/test_triton_interpret.py (which runs the kernels
on CPU under Triton's interpreter), through the registered op this time, plus: one kernel
launch per call each way, torch.compile / torch.export with the op kept, and a training step of
a converted timm ResNet and a HF BERT under bfloat16 autocast. Skipped, with the reason, where
there is no CUDA device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import serfswap
from tests.support import serf_kernel_checks as checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def op_forward(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.serfswap.serf(x)


def op_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.serfswap.serf_backward(grad, x)


def test_cuda_op_is_the_triton_kernel() -> None:
    from serfswap import triton_kernels

    x = torch.randn(10_000, device=CUDA) * 30
    grad = torch.randn_like(x)
    assert torch.equal(op_forward(x), triton_kernels.serf_forward(x))
    assert torch.equal(op_backward(grad, x), triton_kernels.serf_backward(grad, x))


def _kernel_launches(fn) -> int:
    fn()  # compile and warm up first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_kernel_each_way(dtype: torch.dtype) -> None:
    x = torch.randn(1 << 20, device=CUDA, dtype=dtype)
    grad = torch.randn_like(x)
    assert _kernel_launches(lambda: op_forward(x)) == 1
    assert _kernel_launches(lambda: op_backward(grad, x)) == 1


def test_forward_float32_matches_cpu_op() -> None:
    checks.check_forward_float32(op_forward, CUDA)


def test_backward_float32_matches_cpu_op() -> None:
    checks.check_backward_float32(op_backward, CUDA)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_once_like_cpu_op(dtype: torch.dtype) -> None:
    checks.check_half_types(op_forward, op_backward, dtype, CUDA)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (1023,), (1025,), (3, 5, 7)])
def test_odd_and_empty_sizes(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 10
    grad = torch.randn(shape)
    torch.testing.assert_close(op_forward(x.cuda()).cpu(), op_forward(x))
    torch.testing.assert_close(op_backward(grad.cuda(), x.cuda()).cpu(), op_backward(grad, x))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.to(memory_format=torch.channels_last),
        lambda t: t.transpose(1, 3),
        lambda t: t[:, ::2, 1:],
        lambda t: t[:1].expand(3, -1, -1, -1),
    ],
    ids=["channels_last", "transposed", "sliced", "expanded"],
)
def test_layouts_through_autograd(make) -> None:
    x = make(torch.randn(2, 4, 5, 6, device=CUDA)).requires_grad_()
    y = serfswap.serf(x)
    assert y.stride() == torch.empty_like(x).stride()
    y.backward(torch.ones_like(y))
    xc = x.detach().cpu().requires_grad_()
    serfswap.serf(xc).backward(torch.ones_like(xc))
    torch.testing.assert_close(y.detach().cpu(), serfswap.serf(xc.detach()))
    torch.testing.assert_close(x.grad.cpu(), xc.grad)


def test_float64_keeps_the_aten_path() -> None:
    x = torch.linspace(-100, 100, 10_001, dtype=torch.float64)
    torch.testing.assert_close(op_forward(x.cuda()).cpu(), op_forward(x), rtol=1e-15, atol=0)


def test_compile_and_export_with_the_op_kept() -> None:
    """With keep_custom_op the op is one node; compiled and exported programs run its kernel."""
    model = nn.Sequential(nn.Linear(64, 64), serfswap.Serf()).to(CUDA)
    x = torch.randn(8, 64, device=CUDA)
    want = model(x)
    torch._dynamo.reset()
    with serfswap.keep_custom_op():
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
        torch.testing.assert_close(compiled(x), want)
        program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), want)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(copy.deepcopy(model))(x), want)


def _step(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device, amp: bool):
    """One forward and backward; the loss and the flat gradient (float32, on the CPU)."""
    model = copy.deepcopy(model).to(device).train()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = logits.float().square().mean()
    loss.backward()
    grad = torch.cat(
        [p.grad.float().flatten().cpu() for p in model.parameters() if p.grad is not None]
    )
    return loss.detach().float().cpu(), grad


def _check_training_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """The bf16-autocast CUDA step against the float32 CPU step: bf16's 8 bits give a few
    percent on the loss; the gradient keeps its direction."""
    serf_model = serfswap.convert(model)
    loss, grad = _step(serf_model, inputs, CUDA, amp=True)
    want_loss, want_grad = _step(serf_model, inputs, torch.device("cpu"), amp=False)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want_loss, rtol=5e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(grad, want_grad, dim=0) > 0.99


def test_timm_resnet_training_step_bf16_autocast() -> None:
    timm = pytest.importorskip("timm", reason="timm is in the [timm] and [dev] extras")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _check_training_step(model, {"x": torch.randn(4, 3, 64, 64)})


def test_hf_bert_training_step_bf16_autocast() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is in [hf] and [dev]")
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=3,
        hidden_dropout_prob=0.0,  # one step on two devices: no random masks
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    ids = torch.randint(0, 128, (4, 16))
    _check_training_step(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
