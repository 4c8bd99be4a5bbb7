"""SparseEncoderModule's losses on real splade-tiny: the two IDF-aware FLOPS forms agree.

(A wrong penalty, e.g. plain FLOPS on the IDF-weighted contributions, changes the gradients:
tests/retrieval/test_losses.py shows that on the loss functions themselves.)
"""

from __future__ import annotations

import pytest
import torch

from retrieval.models import load_sparse_model
from retrieval.models.idf_query import IdfQueryEncoder
from retrieval.training.module import SparseEncoderModule, in_batch_false_negatives
from tests.retrieval.helpers import splade_tiny

DOCS = [
    "Vitamin D deficiency is associated with fractures in older adults.",
    "Statins reduce LDL cholesterol and cardiovascular events.",
    "Honey bees pollinate crops and produce honey.",
    "Insulin lowers blood glucose; diabetes follows when it fails.",
    "A comet has a tail of gas and dust.",
    "Glaciers carve valleys as they move downhill.",
]
QUERIES = ["vitamin d and bone fractures", "what lowers blood sugar"]


def _gradients(form: str, weights: dict[str, float]) -> tuple[dict[str, torch.Tensor], float]:
    torch.manual_seed(0)
    net = load_sparse_model(str(splade_tiny())).double().train()
    idf = IdfQueryEncoder.fit(str(splade_tiny()), DOCS, max_length=64)
    idf.idf.mul_(torch.linspace(0.05, 2.0, idf.idf.numel()))  # uneven IDF, some tiny values
    module = SparseEncoderModule(
        net,
        idf,
        flops_form=form,
        doc_flops=weights["flops"],
        flops_warmup_steps=1,
        **{k: v for k, v in weights.items() if k != "flops"},
    )
    module.double()
    torch.manual_seed(1)  # same dropout masks in both forms
    q = module.encode_queries(QUERIES)  # (2, V)
    d = module.encode_docs(DOCS)  # (6, V): 2 queries x (1 positive + 2 negatives)
    target = torch.tensor([[30.0, 10.0, 0.0], [30.0, 5.0, 20.0]], dtype=torch.float64)
    losses, w = module.step_losses(q, d, target, step=5)
    total = sum(w[k] * v for k, v in losses.items())
    total.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, total.item()


@pytest.mark.parametrize(
    "weights",
    [
        {"flops": 1e-2, "nce_weight": 1.0, "kl_weight": 0.0},
        {"flops": 1e-1, "nce_weight": 0.0, "kl_weight": 1.0, "margin_mse_weight": 0.5},
    ],
)
def test_score_and_penalty_forms_give_the_same_gradients(weights: dict[str, float]) -> None:
    score, loss_score = _gradients("score", weights)
    penalty, loss_penalty = _gradients("penalty", weights)
    assert loss_score == pytest.approx(loss_penalty, rel=1e-9)
    assert score.keys() == penalty.keys() and len(score) > 10
    for name in score:
        torch.testing.assert_close(score[name], penalty[name], rtol=1e-7, atol=1e-12, msg=name)


def test_in_batch_positives_of_a_query_are_not_its_negatives() -> None:
    # two queries x (1 positive + 1 negative); corpus rows: q0 -> [5, 7], q1 -> [7, 9]
    doc_rows = torch.tensor([[5, 7], [7, 9]])
    positive_rows = torch.tensor([[5, 9, -1], [7, -1, -1]])  # q0 judges 5 and 9; q1 judges 7
    mask = in_batch_false_negatives(doc_rows, positive_rows)
    # q0: column 3 (row 9) is its other positive; q1: column 1 (row 7, q0's negative) is its
    # positive too, but its own target column 2 (also row 7) is kept
    assert mask.tolist() == [[False, False, False, True], [False, True, False, False]]

    net = load_sparse_model(str(splade_tiny())).double()
    idf = IdfQueryEncoder.fit(str(splade_tiny()), DOCS, max_length=64)
    module = SparseEncoderModule(net, idf, nce_weight=1.0, doc_flops=0.0, flops_warmup_steps=1).double()
    q = module.encode_queries(QUERIES)  # (2, V)
    d = module.encode_docs(DOCS[:4])  # (4, V)
    target = torch.zeros(2, 2, dtype=torch.float64)
    masked, _ = module.step_losses(q, d, target, step=1, false_negatives=mask)
    plain, _ = module.step_losses(q, d, target, step=1)
    scores = q @ d.T  # (2, 4)
    log_p0 = scores[0, 0] - scores[0, :3].logsumexp(0)  # column 3 left out
    log_p1 = scores[1, 2] - scores[1, [0, 2, 3]].logsumexp(0)  # column 1 left out
    expected = -(log_p0 + log_p1) / 2
    assert masked["nce"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert masked["nce"].item() < plain["nce"].item()  # the false negatives only added to the denominator
