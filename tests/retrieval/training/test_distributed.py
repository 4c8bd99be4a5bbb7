"""gather_with_grad on 2 gloo CPU processes: DDP-averaged gradients equal the 1-process gradient."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval.losses import flops, info_nce
from retrieval.training.distributed import gather_with_grad, world
from retrieval.training.module import in_batch_false_negatives

WORLD_SIZE = 2
FEATURES, VOCAB = 6, 10
QUERIES, DOCS_PER_QUERY = 4, 3  # each query: 1 positive + 2 hard negatives
LAM = 0.5


DOC_ROWS = torch.tensor([[0, 1, 2], [3, 4, 1], [5, 0, 6], [7, 8, 9]])  # (QUERIES, 3) corpus rows
POSITIVE_ROWS = torch.tensor([[0, 5], [3, 9], [5, -1], [7, 1]])  # judged positives, -1 padding


def encode(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The tiny encoder: (n, FEATURES) -> (n, VOCAB) non-negative term weights."""
    return torch.relu(x @ weights)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder weights, queries, docs): docs[i * 3] is query i's positive, the next 2 its negatives."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(FEATURES, VOCAB, generator=gen, dtype=torch.float64)
    queries = torch.randn(QUERIES, FEATURES, generator=gen, dtype=torch.float64)
    docs = torch.randn(QUERIES * DOCS_PER_QUERY, FEATURES, generator=gen, dtype=torch.float64)
    return weights, queries, docs


def loss_and_grad(weights, queries, docs, doc_offset: int, gather: bool) -> torch.Tensor:
    """Gradient of info_nce over the (gathered) docs + LAM * FLOPS of the gathered or local docs."""
    params = weights.clone().requires_grad_()
    q = encode(params, queries)  # (b_q, V)
    d = encode(params, docs)  # (b_d, V)
    all_docs = gather_with_grad(d)  # (W * b_d, V)
    targets = doc_offset + torch.arange(q.shape[0]) * DOCS_PER_QUERY
    regulariser = flops(all_docs) if gather else flops(d)
    loss = info_nce(q @ all_docs.T, targets) + LAM * regulariser
    loss.backward()
    return params.grad


def ddp_average(grad: torch.Tensor) -> torch.Tensor:
    """What DDP does to a parameter gradient: the mean over ranks."""
    dist.all_reduce(grad)
    return grad / world()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        weights, queries, docs = batch()
        per_rank = QUERIES // WORLD_SIZE
        local_queries = queries[rank * per_rank : (rank + 1) * per_rank]
        local_docs = docs[rank * per_rank * DOCS_PER_QUERY : (rank + 1) * per_rank * DOCS_PER_QUERY]
        offset = rank * per_rank * DOCS_PER_QUERY
        result = {
            "world": world(),
            **{
                name: ddp_average(loss_and_grad(weights, local_queries, local_docs, offset, gather))
                for name, gather in (("gathered", True), ("local_flops", False))
            },
        }
        result["false_negatives"] = in_batch_false_negatives(
            DOC_ROWS[rank * per_rank : (rank + 1) * per_rank],
            POSITIVE_ROWS[rank * per_rank : (rank + 1) * per_rank],
        )
        uneven = torch.zeros(2 + rank, VOCAB)
        try:
            gather_with_grad(uneven)
            result["uneven_error"] = None
        except ValueError as err:
            result["uneven_error"] = str(err)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_gathered_loss_gives_the_single_process_gradient(rank_results: list[dict]) -> None:
    weights, queries, docs = batch()
    reference = loss_and_grad(weights, queries, docs, doc_offset=0, gather=True)  # 1 process, full batch
    assert [r["world"] for r in rank_results] == [(0, 2), (1, 2)]
    for result in rank_results:
        assert torch.allclose(result["gathered"], reference, rtol=1e-10, atol=1e-12)
        # FLOPS on the local shard only is a different objective
        assert not torch.allclose(result["local_flops"], reference, rtol=1e-4, atol=1e-6)


def test_unequal_local_batches_raise_on_every_rank(rank_results: list[dict]) -> None:
    for result in rank_results:
        assert result["uneven_error"] is not None
        assert "same shape" in result["uneven_error"] and "(2, 10)" in result["uneven_error"]
        assert "(3, 10)" in result["uneven_error"]


def test_identity_when_not_distributed() -> None:
    assert not dist.is_initialized()
    assert world() == (0, 1)
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_false_negative_mask_spans_every_rank(rank_results: list[dict]) -> None:
    """Each rank masks its queries' positives among the documents of every rank."""
    single = in_batch_false_negatives(DOC_ROWS, POSITIVE_ROWS)  # (4, 12)
    # q0: rows 5 and 0 (cols 6, 7); q1: row 9 (col 11); q2: none; q3: row 1 (cols 1, 5)
    assert single.nonzero().tolist() == [[0, 6], [0, 7], [1, 11], [3, 1], [3, 5]]
    per_rank = QUERIES // WORLD_SIZE
    for rank, result in enumerate(rank_results):
        assert torch.equal(result["false_negatives"], single[rank * per_rank : (rank + 1) * per_rank])
