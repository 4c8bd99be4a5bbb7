import logging
import math

import pytest
import torch

from retrieval.eval.topk_evaluator import TopKEvaluator, hit_matrix
from retrieval.types import ItemSets

ALL = ("ndcg", "recall", "precision", "mrr", "hit", "map")


def _sets(U, N, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    return ItemSets.from_pairs(
        torch.randint(0, U, (nnz,), generator=g), torch.randint(0, N, (nnz,), generator=g), U, N
    )


def _row(sets, u):
    return set(sets.indices[sets.indptr[u] : sets.indptr[u + 1]].tolist())


def _brute_force(table, targets, exclude, ks):
    """Metrics with python loops, straight from the documented formulas."""
    sums, n_users = {}, 0
    for u in range(targets.num_users):
        T = _row(targets, u)
        if not T:
            continue
        n_users += 1
        banned = _row(exclude, u) if exclude is not None else set()
        ranked = sorted((-float(s), i) for i, s in enumerate(table[u].tolist()) if i not in banned)
        ranked = [i for _, i in ranked]
        for k in ks:
            rel = [1 if i in T else 0 for i in ranked[:k]] + [0] * max(0, k - len(ranked))
            dcg = sum(r / math.log2(p + 2) for p, r in enumerate(rel))
            idcg = sum(1 / math.log2(p + 2) for p in range(min(k, len(T))))
            first = next((p + 1 for p, r in enumerate(rel) if r), None)
            ap = sum(sum(rel[: p + 1]) / (p + 1) for p, r in enumerate(rel) if r) / min(k, len(T))
            for name, v in {
                "ndcg": dcg / idcg,
                "recall": sum(rel) / len(T),
                "precision": sum(rel) / k,
                "mrr": 1 / first if first else 0.0,
                "hit": float(any(rel)),
                "map": ap,
            }.items():
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + v
    return {name: v / n_users for name, v in sums.items()}, n_users


def _problem(seed, U=60, N=35, levels=4, n_train=500, n_test=150):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, levels, (U, N), generator=g).float()  # (U, N) few levels: many ties
    train = _sets(U, N, n_train, seed + 10)
    test = _sets(U, N, n_test, seed + 20)
    # keep test disjoint from train, as a split would
    keep = ~torch.isin(test.row_ids() * N + test.indices, train.row_ids() * N + train.indices)
    test = ItemSets.from_pairs(test.row_ids()[keep], test.indices[keep], U, N)
    return table, train, test


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ks", [(1, 5), (10, 40)])
def test_agrees_with_python_brute_force(seed, ks):
    table, train, test = _problem(seed)
    out = TopKEvaluator(ks=ks)(lambda u: table[u], test, train)
    ref, n_users = _brute_force(table, test, train, ks)
    assert out["num_users"] == n_users == int((test.sizes() > 0).sum())
    assert set(out) == set(ref) | {"num_users"}
    for name, v in ref.items():
        assert out[name] == pytest.approx(v, abs=1e-12), name


def test_chunking_gives_identical_results():
    table, train, test = _problem(3)
    U = table.shape[0]
    results = [
        TopKEvaluator(
            ks=(3, 10), chunk_size=c, compat=("ndcg_ideal_from_retrieved", "recall_min_k")
        ).per_user(lambda u: table[u], test, train)
        for c in (1, 7, U)
    ]
    for other in results[1:]:
        assert torch.equal(other.items, results[0].items)
        for name in results[0].metrics:
            assert torch.equal(other.metrics[name], results[0].metrics[name])


def test_excluded_item_scoring_highest_is_never_counted(caplog):
    U, N = 4, 6
    table = torch.zeros(U, N)
    table[:, 5] = 10.0  # item 5 would be first for everyone
    targets = ItemSets.from_pairs(torch.arange(U), torch.full((U,), 5), U, N)
    exclude = ItemSets.from_pairs(torch.arange(U), torch.full((U,), 5), U, N)
    with caplog.at_level(logging.WARNING):
        out = TopKEvaluator(ks=(5,))(lambda u: table[u], targets, exclude)
    assert out["hit@5"] == 0.0 and out["ndcg@5"] == 0.0 and out["num_users"] == U
    assert "can never be hit" in caplog.text
    assert TopKEvaluator(ks=(1,))(lambda u: table[u], targets, None)["hit@1"] == 1.0


def test_ties_are_broken_by_item_id():
    U, N = 3, 8
    table = torch.ones(U, N)  # every item ties
    targets = ItemSets.from_pairs(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 7]), U, N)
    res = TopKEvaluator(ks=(1, 2), metrics=("hit", "mrr")).per_user(lambda u: table[u], targets, None)
    assert res.items.tolist() == [[0, 1], [0, 1], [0, 1]]
    assert res.metrics["hit@1"].tolist() == [1.0, 0.0, 0.0]
    assert res.metrics["mrr@2"].tolist() == [1.0, 0.5, 0.0]


def test_prefix_names_compat_and_empty_users():
    table, train, test = _problem(4)
    test = ItemSets.from_pairs(
        test.row_ids()[test.row_ids() % 2 == 0],
        test.indices[test.row_ids() % 2 == 0],
        test.num_users,
        test.num_items,
    )
    ev = TopKEvaluator(ks=(10, 20), compat=("ndcg_ideal_from_retrieved", "recall_min_k"))
    out = ev(lambda u: table[u], test, train, prefix="val/")
    names = [f"{m}@{k}" for m in (*ALL, "ndcg_ngcf", "recall_mink") for k in (10, 20)]
    assert list(out) == [f"val/{n}" for n in names] + ["val/num_users"]
    assert out["val/num_users"] == int((test.sizes() > 0).sum())
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k != "val/num_users")
    res = ev.per_user(lambda u: table[u], test, train)
    assert (res.users % 2 == 0).all() and res.items.shape == (res.users.numel(), 20)
    assert res.hits.shape == res.items.shape and res.metrics["ndcg@10"].shape == res.users.shape


def test_hit_matrix_ignores_padding():
    targets = ItemSets.from_pairs(torch.tensor([0, 1]), torch.tensor([2, 0]), 2, 3)
    hits = hit_matrix(torch.tensor([1, 0]), torch.tensor([[0, -1], [2, 1]]), targets)
    assert hits.tolist() == [[True, False], [True, False]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metric"):
        TopKEvaluator(metrics=("auc",))
    with pytest.raises(ValueError, match="compatibility"):
        TopKEvaluator(compat=("ngcf",))
    with pytest.raises(ValueError, match="ks"):
        TopKEvaluator(ks=(0,))
    with pytest.raises(ValueError, match="same users and items"):
        TopKEvaluator()(lambda u: torch.zeros(u.numel(), 3), ItemSets.empty(2, 3), ItemSets.empty(2, 4))


def test_user_subsets_match_the_full_run():
    table, train, test = _problem(5)
    ev = TopKEvaluator(ks=(5,))
    full = ev.per_user(lambda u: table[u], test, train)
    batch = torch.tensor([7, 3, 0, 59, 3])
    res = ev.per_user(lambda u: table[u], test, train, users=batch)
    keep = batch[test.sizes()[batch] > 0]
    assert torch.equal(res.users, keep)
    where = torch.searchsorted(full.users, keep)
    for name, v in res.metrics.items():
        assert torch.equal(v, full.metrics[name][where])
    out = ev(lambda u: table[u], test, train, users=batch)
    assert out["num_users"] == keep.numel()


def test_results_are_on_the_cpu_with_the_documented_dtypes():
    table, train, test = _problem(6)
    ev = TopKEvaluator(ks=(3, 10), compat=("ndcg_ideal_from_retrieved",))
    default = ev.per_user(lambda u: table[u], test, train)
    batch = torch.tensor([9, 2, 40, 2])
    explicit = ev.per_user(lambda u: table[u], test, train, device="cpu", users=batch)
    keep = batch[test.sizes()[batch] > 0]
    assert torch.equal(explicit.users, keep)
    where = torch.searchsorted(default.users, keep)
    for res in (default, explicit):
        assert res.users.dtype == res.items.dtype == torch.int64 and res.hits.dtype == torch.bool
        assert all(v.dtype == torch.float64 and v.shape == res.users.shape for v in res.metrics.values())
        assert not any(t.is_cuda for t in (res.users, res.items, res.hits, *res.metrics.values()))
    assert torch.equal(explicit.items, default.items[where])
    assert torch.equal(explicit.hits, default.hits[where])
    for name, values in explicit.metrics.items():
        assert torch.equal(values, default.metrics[name][where]), name


def test_overlap_warning_counts_each_excluded_target_pair_once(caplog):
    U, N = 5, 6
    table = torch.rand(U, N)
    targets = ItemSets.from_pairs(torch.tensor([0, 0, 1, 3, 4]), torch.tensor([1, 2, 2, 5, 0]), U, N)
    exclude = ItemSets.from_pairs(torch.tensor([0, 1, 3, 4]), torch.tensor([2, 2, 4, 1]), U, N)
    ev = TopKEvaluator(ks=(2,))
    with caplog.at_level(logging.WARNING):
        ev.per_user(lambda u: table[u], targets, exclude, users=torch.tensor([1, 0, 1, 2]))
        ev.per_user(lambda u: table[u], targets, exclude)  # logged once per evaluator
    assert [r.getMessage() for r in caplog.records] == [
        "2 target (user, item) pairs are also excluded and can never be hit"
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sets_on", ["cpu", "cuda"])
@pytest.mark.parametrize("batch", [False, True])
def test_cuda_evaluation_is_the_cpu_evaluation_bit_for_bit(sets_on, batch):
    table, train, test = _problem(7, U=500, N=300, levels=5, n_train=20000, n_test=3000)  # exact scores
    table_c = table.cuda()
    users = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:200] if batch else None
    ev = TopKEvaluator(ks=(1, 5, 20, 50), chunk_size=64, compat=("ndcg_ideal_from_retrieved", "recall_min_k"))
    cpu = ev.per_user(lambda u: table[u], test, train, users=users)
    gpu = ev.per_user(
        lambda u: table_c[u],
        test.to(sets_on),
        train.to(sets_on),
        device="cuda",
        users=None if users is None else users.cuda(),
    )
    for got, want in ((gpu.users, cpu.users), (gpu.items, cpu.items), (gpu.hits, cpu.hits)):
        assert not got.is_cuda and got.dtype == want.dtype and torch.equal(got, want)
    assert list(gpu.metrics) == list(cpu.metrics)
    for name, values in cpu.metrics.items():
        got = gpu.metrics[name]
        assert not got.is_cuda and got.dtype == torch.float64 and torch.equal(got, values), name
    assert ev(lambda u: table_c[u], test, train, device="cuda") == ev(lambda u: table[u], test, train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sets_on_another_device_than_the_scores():
    table, train, test = _problem(8, U=500, N=300, levels=5, n_train=20000, n_test=3000)
    ev = TopKEvaluator(ks=(5, 20), chunk_size=64)
    cpu = ev.per_user(lambda u: table[u], test, train)
    # user ids and sets on the GPU, scores on the CPU: the sets follow the scores
    mixed = ev.per_user(lambda u: table[u.cpu()], test.to("cuda"), train.to("cuda"), device="cuda")
    assert torch.equal(mixed.items, cpu.items) and torch.equal(mixed.hits, cpu.hits)
    for name, values in cpu.metrics.items():
        assert torch.equal(mixed.metrics[name], values), name


def _dot_problem(seed, U=40, N=300, d=8):
    """Integer embeddings (exact float32 scores, many ties), training and test sets."""
    g = torch.Generator().manual_seed(seed)
    user_emb = torch.randint(-2, 3, (U, d), generator=g).float()  # (U, d)
    item_emb = torch.randint(-2, 3, (N, d), generator=g).float()  # (N, d)
    return user_emb, item_emb, _sets(U, N, 400, seed + 10), _sets(U, N, 200, seed + 20)


def test_embeddings_are_ignored_on_cpu():
    """On the CPU the evaluator keeps its score_fn path: passing embeddings changes no bit."""
    user_emb, item_emb, train, test = _dot_problem(0)
    ev = TopKEvaluator(ks=(5, 20))
    plain = ev.per_user(lambda u: user_emb[u] @ item_emb.T, test, train)
    with_emb = ev.per_user(lambda u: user_emb[u] @ item_emb.T, test, train, embeddings=(user_emb, item_emb))
    assert torch.equal(plain.items, with_emb.items)
    for name, values in plain.metrics.items():
        assert torch.equal(values, with_emb.metrics[name]), name


def test_fused_ranking_matches_full_sort():
    """The fused path's lists (the torch reference on CPU tensors) equal full_sort_topk's, ties by id."""
    from retrieval.eval.topk import full_sort_topk
    from retrieval.eval.topk_evaluator import fused_ranking

    user_emb, item_emb, train, _ = _dot_problem(1)
    users = torch.tensor([3, 0, 39, 3, 17])
    want = full_sort_topk(lambda u: user_emb[u] @ item_emb.T, users, 25, exclude=train)[1]
    assert torch.equal(fused_ranking((user_emb, item_emb), users, 25, train), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_kernel_on_cuda_gives_the_same_metrics(seed):
    """On CUDA, embeddings route ranking through the kernel: identical lists on exact (integer) scores."""
    user_emb, item_emb, train, test = _dot_problem(seed, U=300, N=5000, d=16)
    user_emb, item_emb = user_emb.cuda(), item_emb.cuda()
    ev = TopKEvaluator(ks=(10, 50))
    plain = ev.per_user(lambda u: user_emb[u] @ item_emb.T, test, train, device="cuda")
    fused = ev.per_user(
        lambda u: user_emb[u] @ item_emb.T, test, train, device="cuda", embeddings=(user_emb, item_emb)
    )
    assert torch.equal(plain.items, fused.items)
    for name, values in plain.metrics.items():
        assert torch.equal(values, fused.metrics[name]), name
