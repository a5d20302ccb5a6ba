"""Causal LMs in recovery: the task decision, the per-token KL, perplexity and next-token
agreement against a hand computation, and packed text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import serfswap
from serfswap.recovery.data import pack_tokens, packed_batches
from serfswap.recovery.distill import TeacherOutputs, distillation_loss, evaluate, task_kind
from serfswap.recovery.lm import headline, is_causal_lm, token_kl
from tests.support.models import TINY_BERT, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")


def test_the_task_decision() -> None:
    llama = tiny_llama()
    ids = torch.tensor([[1, 2, 3]])
    assert is_causal_lm(llama)
    assert task_kind(llama, {"logits": llama(ids).logits}) == "causal-lm"
    bert = transformers.BertConfig(**TINY_BERT)
    decoder = transformers.BertLMHeadModel(transformers.BertConfig(**TINY_BERT, is_decoder=True))
    assert is_causal_lm(decoder)
    assert not is_causal_lm(transformers.BertForMaskedLM(bert))  # predicts its own tokens
    classifier = transformers.BertForSequenceClassification(bert)
    assert task_kind(classifier, {"logits": torch.zeros(1, 2)}) == "classifier"
    encoder = transformers.BertModel(bert)
    assert task_kind(encoder, {"last_hidden_state": torch.zeros(1, 3, 32)}) == "embedding"
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=37, num_layers=1, num_heads=2, vocab_size=99)
    )
    assert not is_causal_lm(t5)  # generates, from an encoder's input


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over kept positions of sum_v p log(p / q), one position at a time."""
    total, n = 0.0, 0
    for b in range(teacher.shape[0]):
        for i in range(teacher.shape[1]):
            if keep[b, i]:
                p, q = teacher[b, i].softmax(-1).double(), student[b, i].softmax(-1).double()
                total += float((p * (p / q).log()).sum())
                n += 1
    return total / n


def test_token_kl() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert token_kl(teacher, teacher, 2.0, mask).item() == pytest.approx(0, abs=1e-6)
    assert token_kl(student, teacher, 1.0, mask).item() == pytest.approx(
        hand_kl(student, teacher, mask.bool()), rel=1e-5
    )
    # temperature T: the KL of the logits divided by T, times T^2
    t = 3.0
    assert token_kl(student, teacher, t, mask).item() == pytest.approx(
        t * t * hand_kl(student / t, teacher / t, mask.bool()), rel=1e-5
    )
    # a padded position's logits change nothing; a real one's do
    changed = student.clone()
    changed[1, 4] += 10 * torch.randn(11, generator=g)
    assert token_kl(changed, teacher, 2.0, mask).item() == token_kl(student, teacher, 2.0, mask)
    changed[1, 2] += 10 * torch.randn(11, generator=g)
    assert token_kl(changed, teacher, 2.0, mask).item() != token_kl(student, teacher, 2.0, mask)
    # the step's loss on per-token logits is this KL, by the batch's mask
    loss, _ = distillation_loss({"logits": student}, {"logits": teacher}, kind="kl",
                                temperature=2.0, mask=mask)  # fmt: skip
    assert loss.item() == pytest.approx(token_kl(student, teacher, 2.0, mask).item())


def test_perplexity_and_agreement_match_a_hand_computation() -> None:
    """Two right-padded batches: each sequence scored alone, unpadded, by hand."""
    teacher = tiny_llama(initializer_range=0.5)  # large activations: the swap shows
    student = serfswap.convert(teacher).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [[7, 4, 6], [5, 7, 2]]
    batches = []
    for row_lengths in lengths:
        ids = torch.randint(0, 50, (3, 7), generator=g)
        mask = (torch.arange(7) < torch.tensor(row_lengths)[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    nll = {"student": 0.0, "teacher": 0.0}
    tokens = agree = positions = 0
    with torch.no_grad():
        for batch in batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                real = ids[mask.bool()][None]
                logits = {"student": student(real).logits[0], "teacher": teacher(real).logits[0]}
                for role, out in logits.items():
                    nll[role] += F.cross_entropy(out[:-1], real[0, 1:], reduction="sum").item()
                tokens += real.shape[1] - 1
                agree += int((logits["student"].argmax(-1) == logits["teacher"].argmax(-1)).sum())
                positions += real.shape[1]
    got = evaluate(student, teacher, batches, torch.device("cpu"))
    for budget, kept in ((2**20, 2), (0, 0)):  # the teacher's logits kept, or over budget
        cache = TeacherOutputs(budget)
        for _ in range(2):  # computes (and keeps), then takes what it kept
            assert evaluate(student, teacher, batches, torch.device("cpu"), cache=cache) == got
        assert len(cache.kept) == kept
    assert got["perplexity"] == pytest.approx(math.exp(nll["student"] / tokens), rel=1e-4)
    assert got["original_perplexity"] == pytest.approx(math.exp(nll["teacher"] / tokens), rel=1e-4)
    assert got["perplexity_ratio"] == pytest.approx(got["perplexity"] / got["original_perplexity"])
    assert got["agreement"] == pytest.approx(agree / positions)
    assert got["agreement"] < 1  # the swap changed some top-1 token: the figure can fail
    lines = headline(got, got)
    assert lines[0].startswith(f"perplexity {got['perplexity']:.2f} -> ")
    assert "original" in lines[0] and "next-token agreement" in lines[1]


def test_packing_keeps_every_token_in_order_and_pads_nothing() -> None:
    sequences = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    rows = pack_tokens(sequences, eos_id=2, max_length=4)
    # 5 6 7 2 | 8 9 2 10 | 11 12 13 2 | (14 2: the tail, dropped)
    assert rows.tolist() == [[5, 6, 7, 2], [8, 9, 2, 10], [11, 12, 13, 2]]
    assert pack_tokens([[5, 6]], eos_id=2, max_length=8).tolist() == [[5, 6, 2]]  # no full row
    batches = packed_batches(rows, 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), rows)
