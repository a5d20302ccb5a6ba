"""The relational term of recovery for embedding models: the student's in-batch similarities
matched to the teacher's.

What a retrieval user sees of an embedding model is a ranking: which sentence is nearest to the
query. The pooled-embedding MSE and cosine (``distill.embedding_loss``) pull each embedding
towards the teacher's one at a time; a small error in each can still reorder two candidates
that the teacher placed close together. This term looks at the batch as the user does: for
each example, the softmax over its cosine similarities to the other examples, at a low
temperature (so that the nearest few dominate), is matched to the teacher's with KL. It is
scale free (cosines), and zero exactly when the student ranks and spaces the batch like the
teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_logits(embeddings: Tensor, temperature: float) -> Tensor:
    """Each row's cosine similarities to the *other* rows over ``temperature``: (n, n - 1).

    The diagonal (an example's similarity to itself, always 1) is left out rather than masked
    with -inf, which would make the KL of two identical rows NaN (0 * (-inf - -inf))."""
    unit = F.normalize(embeddings.float(), dim=-1)
    n = unit.shape[0]
    sim = unit @ unit.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim[off_diagonal].view(n, n - 1) / temperature


def relational_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) between the row-wise softmaxes of the in-batch cosine
    similarities of ``student`` and ``teacher`` embeddings (one row per example), at
    ``temperature``, averaged over the rows. Zero for a batch of one or two, where no example
    has two neighbours to rank.

    Not scaled by temperature squared as Hinton's KL on logits is: cosines have no natural
    temperature of 1 to keep gradients comparable with, and unscaled, at 0.05, the term is of
    the size of the cosine term it is added to (a student at cosine 0.995 to random teacher
    vectors: about 0.01 for both), so that a weight of 1 means "as much as the embeddings"."""
    if student.shape[0] < 2:
        return student.float().sum() * 0.0  # keeps the graph: backward() still works
    s = similarity_logits(student, temperature)
    with torch.no_grad():
        t = similarity_logits(teacher, temperature)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    return kl


def add_relational(
    loss: Tensor,
    parts: dict[str, float],
    student_out: dict[str, Tensor],
    teacher_out: dict[str, Tensor],
    mask: Tensor | None,
    *,
    weight: float,
    temperature: float,
) -> tuple[Tensor, dict[str, float]]:
    """``loss`` plus ``weight`` times :func:`relational_loss` of the pooled embeddings (the
    masked mean of the tokens for hidden states, as sentence-transformers pools), and the
    step's record with it as ``relational``. Under torchrun each rank ranks its own slice."""
    from .distill import embedding

    term = relational_loss(embedding(student_out, mask), embedding(teacher_out, mask), temperature)
    term = weight * term
    return loss + term, {**parts, "relational": term.item()}
