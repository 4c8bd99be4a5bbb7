import math

import pytest
import torch
from torch_geometric.metrics import (
    LinkPredHitRatio,
    LinkPredMAP,
    LinkPredMRR,
    LinkPredNDCG,
    LinkPredPrecision,
    LinkPredRecall,
)

from retrieval.eval import rec_metrics as rm
from retrieval.eval.topk_evaluator import hit_matrix
from retrieval.types import ItemSets


def _h(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def _at(table, k):
    return float(table[0, k - 1])


def test_worked_case_one_hit_at_rank_2_of_3_targets():
    hits, n = _h([0, 1]), torch.tensor([3])
    inv = 1 / math.log2(3)
    assert _at(rm.ndcg(hits, n), 2) == pytest.approx(inv / (1 + inv))
    assert _at(rm.ndcg(hits, n), 2) == pytest.approx(0.38685, abs=5e-6)
    assert _at(rm.recall(hits, n), 2) == pytest.approx(1 / 3)
    assert _at(rm.precision(hits), 2) == pytest.approx(0.5)
    assert _at(rm.mrr(hits), 2) == pytest.approx(0.5)
    assert _at(rm.hit(hits), 2) == 1.0
    assert _at(rm.map_(hits, n), 2) == pytest.approx(0.5 / 2)  # P@2 * rel_2 / min(2, 3)
    for fn in (rm.ndcg, rm.recall, rm.precision, rm.mrr, rm.hit, rm.map_):
        assert _at(fn(hits, n), 1) == 0.0  # nothing at rank 1
    # compatibility modes: ideal from the list's own single hit; recall over min(2, 3)
    assert _at(rm.ndcg_ideal_from_retrieved(hits, n), 2) == pytest.approx(inv)
    assert _at(rm.recall_min_k(hits, n), 2) == pytest.approx(0.5)


def test_fewer_targets_than_k():
    hits, n = _h([1, 0, 1, 0, 0]), torch.tensor([2])
    idcg2 = 1 + 1 / math.log2(3)
    assert _at(rm.ndcg(hits, n), 5) == pytest.approx((1 + 1 / math.log2(4)) / idcg2)
    assert _at(rm.ndcg(hits, n), 1) == pytest.approx(1.0)  # IDCG@1 over min(1, 2) = 1 item
    assert _at(rm.ndcg(hits, n), 2) == pytest.approx(1 / idcg2)
    assert _at(rm.recall(hits, n), 5) == pytest.approx(1.0)
    assert _at(rm.recall(hits, n), 2) == pytest.approx(0.5)
    assert _at(rm.precision(hits), 5) == pytest.approx(0.4)
    assert _at(rm.precision(hits), 3) == pytest.approx(2 / 3)
    assert _at(rm.mrr(hits), 5) == pytest.approx(1.0)
    assert _at(rm.map_(hits, n), 5) == pytest.approx((1 + 2 / 3) / 2)
    assert _at(rm.map_(hits, n), 1) == pytest.approx(1.0)  # 1 / min(1, 2)
    assert _at(rm.map_(hits, n), 2) == pytest.approx(1 / 2)


def test_mrr_and_hit_pick_the_first_hit():
    hits = _h([0, 0, 1, 1], [0, 0, 0, 0])
    assert rm.mrr(hits).tolist() == [[0, 0, 1 / 3, 1 / 3], [0, 0, 0, 0]]
    assert rm.hit(hits).tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("K", [1, 3, 10])
def test_perfect_list_scores_one(K):
    hits, n = torch.ones(2, K, dtype=torch.bool), torch.tensor([K, K])
    ones = torch.ones(2, K, dtype=torch.float64)
    for fn in (rm.ndcg, rm.precision, rm.mrr, rm.hit, rm.map_, rm.ndcg_ideal_from_retrieved, rm.recall_min_k):
        assert torch.allclose(fn(hits, n), ones)
    assert torch.allclose(rm.recall(hits, n), torch.arange(1, K + 1, dtype=torch.float64) / K)


def test_ngcf_ideal_depends_on_the_list_length():
    # hit at rank 1 and rank 4 of a 4-long list, 10 targets. NGCF's NDCG@2 uses h = hits in all 4.
    hits, n = _h([1, 0, 0, 1]), torch.tensor([10])
    idcg2 = 1 + 1 / math.log2(3)
    assert _at(rm.ndcg_ideal_from_retrieved(hits, n), 2) == pytest.approx(1 / idcg2)  # h = 2
    assert _at(rm.ndcg_ideal_from_retrieved(hits[:, :2], n), 2) == pytest.approx(1.0)  # h = 1
    assert _at(rm.ndcg(hits, n), 2) == pytest.approx(1 / idcg2)  # min(2, 10) = 2
    assert _at(rm.ndcg_ideal_from_retrieved(_h([0, 0, 0, 0]), n), 4) == 0.0


def test_users_without_targets_are_zero_and_left_out_of_means():
    hits, n = _h([1, 0], [0, 0]), torch.tensor([1, 0])
    per_user = rm.compute_metrics(hits, n, ks=[2])
    for name, v in per_user.items():
        assert v[1] == 0.0, name
    means = rm.mean_over_users(per_user, n)
    assert means["recall@2"] == 1.0 and means["ndcg@2"] == 1.0 and means["precision@2"] == 0.5


def test_compute_metrics_names_and_validation():
    hits, n = _h([1, 0, 1]), torch.tensor([2])
    out = rm.compute_metrics(hits, n, ks=[1, 3], compat=["ndcg_ideal_from_retrieved", "recall_min_k"])
    assert list(out) == [f"{m}@{k}" for m in (*rm.METRICS, "ndcg_ngcf", "recall_mink") for k in (1, 3)]
    assert all(v.shape == (1,) and v.dtype == torch.float64 for v in out.values())
    with pytest.raises(ValueError, match="cutoffs"):
        rm.compute_metrics(hits, n, ks=[4])
    with pytest.raises(ValueError, match="unknown metric"):
        rm.compute_metrics(hits, n, ks=[1], metrics=["auc"])
    with pytest.raises(ValueError, match="compatibility"):
        rm.compute_metrics(hits, n, ks=[1], compat=["ngcf"])
    with pytest.raises(ValueError, match="more hits than targets"):
        rm.ndcg(hits, torch.tensor([1]))


def _random_lists(seed, U=64, N=40, K=12):
    """Random distinct top-K lists and random target sets (some empty, some larger than K)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(U)])  # (U, K)
    sizes = torch.randint(0, 25, (U,), generator=g)
    sizes[:3] = torch.tensor([0, 1, K + 5])
    users, items = [], []
    for u in range(U):
        t = torch.randperm(N, generator=g)[: int(sizes[u])]
        # bias targets towards the list so that hits are common
        t = torch.unique(torch.cat([t, pred[u, : int(sizes[u]) // 2]]))
        users.append(torch.full_like(t, u))
        items.append(t)
    users, items = torch.cat(users), torch.cat(items)
    return pred, users, items, ItemSets.from_pairs(users, items, U, N)


def _pyg(metric, pred, users, items):
    metric.update(pred, torch.stack([users, items]))
    return float(metric.compute())


PYG_SAME = {
    "ndcg": LinkPredNDCG,
    "recall": LinkPredRecall,
    "precision": LinkPredPrecision,
    "mrr": LinkPredMRR,
    "hit": LinkPredHitRatio,
    "map": LinkPredMAP,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("name", list(PYG_SAME))
def test_matches_torch_geometric_link_pred_metrics(name, k, seed):
    """PyG's unweighted LinkPred* metrics use our conventions exactly (incl. averaging over |T|>0)."""
    pred, users, items, targets = _random_lists(seed)
    hits = hit_matrix(torch.arange(pred.shape[0]), pred, targets)
    n_true = targets.sizes()
    ours = rm.mean_over_users(rm.compute_metrics(hits, n_true, ks=[k], metrics=[name]), n_true)
    assert ours[f"{name}@{k}"] == pytest.approx(_pyg(PYG_SAME[name](k), pred, users, items), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_compat_modes_differ_from_torch_geometric_as_documented(k, seed):
    pred, users, items, targets = _random_lists(seed)
    hits = hit_matrix(torch.arange(pred.shape[0]), pred, targets)  # (U, 12)
    n_true = targets.sizes()
    valid = n_true > 0
    per_user = rm.compute_metrics(hits, n_true, ks=[k], compat=list(rm.COMPAT))
    ngcf, std = per_user[f"ndcg_ngcf@{k}"], per_user[f"ndcg@{k}"]
    # ideal from the retrieved list's hits h <= |T_u|: never below the standard value, equal iff
    # min(k, h) == min(k, |T_u|) or there is no hit in the top k
    n_ret = hits.sum(1)
    same_ideal = torch.minimum(n_ret, torch.tensor(k)) == torch.minimum(n_true, torch.tensor(k))
    assert (ngcf >= std - 1e-12).all()
    assert torch.allclose(ngcf[same_ideal], std[same_ideal])
    assert (ngcf[~same_ideal & (hits[:, :k].sum(1) > 0)] > std[~same_ideal & (hits[:, :k].sum(1) > 0)]).all()
    mink, rec = per_user[f"recall_mink@{k}"], per_user[f"recall@{k}"]
    assert torch.allclose(mink[n_true <= k], rec[n_true <= k])
    expected = rec[valid] * n_true[valid] / torch.minimum(n_true[valid], torch.tensor(k))
    assert torch.allclose(mink[valid], expected.double())
    # the standard values are PyG's
    pyg_ndcg = _pyg(LinkPredNDCG(k), pred, users, items)
    assert rm.mean_over_users({"x": std}, n_true)["x"] == pytest.approx(pyg_ndcg, abs=1e-5)


def test_torch_geometric_counts_minus_one_padding_as_a_hit_ours_never():
    """A documented difference: PyG flattens ``row * max_index + item``, so a ``-1`` pad in row u
    aliases the largest item id of row u - 1 and becomes a false hit; our hit matrix masks pads."""
    pred = torch.tensor([[0, 1], [3, -1]])  # user 1's list is padded
    users, items = torch.tensor([0, 1]), torch.tensor([3, 0])  # T_0 = {3}, T_1 = {0}
    assert _pyg(LinkPredRecall(2), pred, users, items) == pytest.approx(0.5)  # user 1 "hits" via -1
    targets = ItemSets.from_pairs(users, items, 2, 4)
    hits = hit_matrix(torch.arange(2), pred, targets)
    assert not hits.any()


@pytest.mark.parametrize("K", [1, 7, 64])
def test_left_to_right_running_sum_is_the_cpu_cumsum_bit_for_bit(K):
    """The GPU path of the running sums (DCG, MAP) adds columns in the CPU cumsum's order."""
    g = torch.Generator().manual_seed(K)
    x = torch.rand(500, K, generator=g, dtype=torch.float64) / torch.rand(K, generator=g, dtype=torch.float64)
    assert torch.equal(rm._cumsum_left_to_right(x), torch.cumsum(x, dim=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_metrics_are_the_cpu_metrics_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    hits = torch.rand(3000, 50, generator=g) < 0.2  # (U, 50)
    n_true = hits.sum(1) + torch.randint(0, 30, (3000,), generator=g)  # some users have |T_u| = 0
    ks, compat = (1, 3, 10, 20, 50), list(rm.COMPAT)
    cpu = rm.compute_metrics(hits, n_true, ks, compat=compat)
    gpu = rm.compute_metrics(hits.cuda(), n_true.cuda(), ks, compat=compat)
    assert list(gpu) == list(cpu)
    for name, values in cpu.items():
        assert gpu[name].is_cuda and gpu[name].dtype == torch.float64
        assert torch.equal(gpu[name].cpu(), values), name


def test_dcg_on_request_is_the_unnormalised_sum():
    hits = torch.tensor([[False, True, True], [True, False, False]])
    got = rm.compute_metrics(hits, torch.tensor([2, 5]), [1, 3], metrics=["dcg", "ndcg"])
    torch.testing.assert_close(got["dcg@3"], torch.tensor([1 / math.log2(3) + 0.5, 1.0], dtype=torch.float64))
    assert got["dcg@1"].tolist() == [0.0, 1.0]
    assert "dcg" not in rm.METRICS  # not in the default set
