"""The relational term for embedding models (in-batch similarity rankings), its options, and the
before/after lines in the user's terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import serfswap
from serfswap.recovery.measures import headline, pool_size
from serfswap.recovery.relational import relational_loss
from tests.support.models import tiny_bert_config


def clustered(n: int = 24, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Embeddings in tight pairs (each example has one clear nearest neighbour), as sentence
    embeddings of paraphrases are."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n // 2, dim, generator=g)
    return torch.cat([centres, centres + 0.3 * torch.randn(n // 2, dim, generator=g)])


def neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1).T
    return sim.fill_diagonal_(-2).argmax(-1)


def test_zero_for_the_teacher_itself_and_blind_to_scale_and_rotation() -> None:
    teacher = clustered()
    assert relational_loss(teacher, teacher, 0.05).item() == pytest.approx(0, abs=1e-7)
    noisy = teacher + 0.5 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1))
    loss = relational_loss(noisy, teacher, 0.05).item()
    assert loss > 1e-3
    # cosines only: the scale of either side does not matter
    assert relational_loss(7 * noisy, teacher, 0.05).item() == pytest.approx(loss, rel=1e-4)
    assert relational_loss(noisy, 0.1 * teacher, 0.05).item() == pytest.approx(loss, rel=1e-4)
    # relations, not positions: a rotated batch (every cosine to the teacher's row lost) keeps
    # all its in-batch similarities, so the term is zero while the cosine term is not
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)))
    rotated = teacher @ rotation
    assert F.cosine_similarity(rotated, teacher).mean() < 0.5
    assert relational_loss(rotated, teacher, 0.05).item() == pytest.approx(0, abs=1e-6)


def test_lower_temperature_weighs_the_nearest_neighbours() -> None:
    """Swapping which of two candidates is nearest costs more, relative to moving a far one by
    as much, at a low temperature than at a high one."""
    teacher = F.normalize(clustered(), dim=-1)
    near = teacher.clone()
    near[0] = F.normalize(teacher[0] + 0.6 * (teacher[3] - teacher[12]), dim=-1)
    assert neighbours(near)[0] != neighbours(teacher)[0], "the perturbation changes the NN"
    ratio = {t: relational_loss(near, teacher, t).item() for t in (0.05, 1.0)}
    assert all(v > 0 for v in ratio.values())
    far_moved = teacher + 0.05 * torch.randn(teacher.shape, generator=torch.Generator())
    ratio = {t: v / relational_loss(far_moved, teacher, t).item() for t, v in ratio.items()}
    assert ratio[0.05] > ratio[1.0]


def test_optimising_it_restores_the_teachers_neighbours() -> None:
    teacher = clustered()
    g = torch.Generator().manual_seed(3)
    student = (teacher + 1.5 * torch.randn(teacher.shape, generator=g)).requires_grad_()
    assert (neighbours(student.detach()) == neighbours(teacher)).float().mean() < 0.5
    optimizer = torch.optim.Adam([student], lr=0.05)
    losses = []
    for _ in range(60):
        loss = relational_loss(student, teacher, 0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    assert torch.equal(neighbours(student.detach()), neighbours(teacher))


def test_a_batch_of_one_has_nothing_to_rank() -> None:
    student = torch.randn(1, 8, requires_grad=True)
    loss = relational_loss(student, torch.randn(1, 8), 0.05)
    assert loss.item() == 0
    loss.backward()  # still part of the graph


@pytest.mark.parametrize(
    ("name", "value"),
    [("relational_weight", -1.0), ("relational_weight", math.inf),
     ("relational_weight", math.nan), ("relational_temperature", 0.0),
     ("relational_temperature", -0.1), ("relational_temperature", math.nan)],
)  # fmt: skip
def test_the_options_are_checked(name: str, value: float) -> None:
    with pytest.raises(serfswap.InvalidArgumentError, match=name) as caught:
        serfswap.RecoveryOptions(**{name: value})
    assert caught.value.option == name


def test_recover_adds_the_term_for_embeddings_only() -> None:
    """An embedding model's step records the weighted relational term (and the loss includes
    it); a classifier's has none, whatever the weight."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the [hf] extra")
    torch.manual_seed(0)
    teacher = transformers.BertModel(tiny_bert_config(initializer_range=0.3)).eval()
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(8, 10, dtype=torch.long)
    batches = [{"input_ids": torch.randint(0, 99, (8, 10), generator=g), "attention_mask": ones}
               for _ in range(2)]  # fmt: skip
    runs = {}
    for weight in (0.0, 4.0):
        student = serfswap.convert(teacher)
        runs[weight] = serfswap.recover(student, teacher, batches, steps=2, progress=False,
                                        relational_weight=weight).history  # fmt: skip
    assert "relational" not in runs[0.0][0]
    first = runs[4.0][0]
    assert first["relational"] > 0
    assert first["loss"] == pytest.approx(first["output"] + first["layer"] + first["relational"])
    classifier = transformers.BertForSequenceClassification(tiny_bert_config()).eval()
    history = serfswap.recover(serfswap.convert(classifier), classifier, batches, steps=1,
                               progress=False, relational_weight=4.0).history  # fmt: skip
    assert "relational" not in history[0]


def test_the_lines_in_the_users_terms() -> None:
    embedding = headline({"agreement": 0.5, "cosine": 0.51}, {"agreement": 0.96, "cosine": 0.997},
                         {"agreement": 1.0, "cosine": 1.0}, 64)  # fmt: skip
    assert embedding == [
        "nearest neighbours agree with the original's: 0.500 -> 0.960 (original 1.000), each "
        "searched among the 64 examples of a held-out batch",
        "embedding cosine to the original's: 0.5100 -> 0.9970 (original 1.0000)",
    ]
    before = {"agreement": 0.6, "kl": 1.0, "accuracy": 0.6, "cosine": 0.9}
    after = {"agreement": 0.99, "kl": 0.01, "accuracy": 0.985, "cosine": 0.999}
    original = {"agreement": 1.0, "kl": 0.0, "accuracy": 0.99, "cosine": 1.0}
    classifier = headline(before, after, original, 100)
    assert classifier[:2] == [
        "top-1 agreement with the original: 0.600 -> 0.990 (original 1.000)",
        "accuracy: 60.00% -> 98.50% (original 99.00%)",
    ]
    assert headline({}, {"agreement": 0.5}, {}, 8) == [
        "nearest neighbours agree with the original's: 0.500, each searched among the 8 "
        "examples of a held-out batch"
    ]
    assert headline({}, {}, {}, 0) == []
    batch = {"input_ids": torch.zeros(5, 3), "attention_mask": torch.ones(5, 3)}
    assert pool_size([batch, {k: v[:2] for k, v in batch.items()}]) == 5
    assert pool_size([(torch.zeros(7, 3), torch.zeros(7))]) == 7
