"""Semantic IDs: residual k-means codes, the collision suffix, the file and the decoding trie."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from recsys.semantic_ids import SemanticIds, code_stats, disambiguate, residual_kmeans


def _blobs(per_blob: int = 25, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(4 * per_blob, dim) points around 4 far-apart centres, and (4 * per_blob,) their blob labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.eye(4, dim)  # (4, dim)
    labels = torch.arange(4).repeat_interleave(per_blob)  # (N,)
    return centres[labels] + 0.1 * torch.randn(labels.numel(), dim, generator=g), labels


def _reconstruction_error(x: Tensor, codes: Tensor, centroids: list[Tensor]) -> float:
    recon = sum(c[codes[:, level]] for level, c in enumerate(centroids))  # (I, d)
    return float((x - recon).pow(2).sum(1).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_blobs(seed: int) -> None:
    x, labels = _blobs(seed=seed)
    codes, centroids = residual_kmeans(x, levels=1, codebook_size=4, seed=seed)
    assert codes.shape == (100, 1) and codes.dtype == torch.int64
    assert len(centroids) == 1 and centroids[0].shape == (4, 8)
    code_of_blob = codes[torch.arange(4) * 25, 0]  # (4,) the code of each blob's first point
    assert torch.unique(code_of_blob).numel() == 4  # a bijection ...
    assert torch.equal(codes[:, 0], code_of_blob[labels])  # ... that every point follows


def test_kmeans_is_deterministic_and_levels_refine() -> None:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    codes_a, cents_a = residual_kmeans(x, levels=2, codebook_size=4, seed=3)
    codes_b, cents_b = residual_kmeans(x, levels=2, codebook_size=4, seed=3)
    assert torch.equal(codes_a, codes_b) and all(
        torch.equal(a, b) for a, b in zip(cents_a, cents_b, strict=True)
    )
    one_codes, one_cents = residual_kmeans(x, levels=1, codebook_size=4, seed=3)
    assert torch.equal(one_codes[:, 0], codes_a[:, 0])  # level 1 does not depend on later levels
    assert _reconstruction_error(x, codes_a, cents_a) < 0.9 * _reconstruction_error(x, one_codes, one_cents)
    assert _reconstruction_error(x, one_codes, one_cents) < float(x.pow(2).sum(1).mean())


def test_kmeans_with_fewer_points_than_codes() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 5.0]])  # 3 distinct points
    codes, centroids = residual_kmeans(x, levels=2, codebook_size=8)
    assert codes.shape == (4, 2) and all(c.shape == (8, 2) for c in centroids)
    assert codes[1, 0] == codes[2, 0] and torch.unique(codes[:, 0]).numel() == 3
    torch.testing.assert_close(centroids[0][codes[:, 0]], x)  # every point is its own centroid


def test_kmeans_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="infinite"):
        residual_kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, 2)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        residual_kmeans(torch.randn(5, 2), 0, 2)
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        residual_kmeans(torch.randn(5, 2), 1, 1)


def test_disambiguate_and_stats() -> None:
    codes = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 2], [0, 1], [2, 3]])
    full = disambiguate(codes)
    assert full.shape == (6, 3) and torch.equal(full[:, :2], codes)
    assert full[:, 2].tolist() == [0, 0, 1, 0, 2, 1]  # numbered in row order within each tuple
    assert torch.unique(full, dim=0).shape[0] == 6
    stats = code_stats(codes, codebook_size=4)
    assert stats.collision_rate == pytest.approx(5 / 6)  # all but (0, 2) share their tuple
    assert stats.max_collisions == 3 and stats.suffix_size == 3
    assert stats.utilisation == pytest.approx((2 / 4, 3 / 4))
    assert code_stats(torch.tensor([[0], [1]]), 2).collision_rate == 0.0


def test_build_gives_unique_codes() -> None:
    emb = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ids = SemanticIds.build(emb, torch.arange(300) + 1000, levels=2, codebook_size=8, source="random")
    assert ids.codes.shape == (300, 3) and ids.codes.dtype == torch.int64
    assert torch.unique(ids.codes, dim=0).shape[0] == 300
    assert ids.num_items == 300 and ids.depth == 3
    assert ids.vocab_sizes == (8, 8, ids.suffix_size) and ids.suffix_size == int(ids.codes[:, 2].max()) + 1
    assert int(ids.codes[:, :2].max()) < 8
    with pytest.raises(ValueError, match="one id per embedding row"):
        SemanticIds.build(emb, torch.arange(299), levels=2, codebook_size=8, source="random")
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        SemanticIds.build(emb, torch.arange(300), levels=2, codebook_size=1, source="random")


def test_save_load_and_check_items(tmp_path: Path) -> None:
    emb = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    ids = SemanticIds.build(emb, torch.arange(40), levels=2, codebook_size=4, source="text:test")
    path = tmp_path / "sub" / "semantic_ids.pt"
    ids.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["semantic_ids.pt"]  # no temp file left behind
    back = SemanticIds.load(path)
    assert torch.equal(back.codes, ids.codes) and torch.equal(back.item_ids, ids.item_ids)
    assert back.stats == ids.stats and back.source == "text:test" and back.vocab_sizes == ids.vocab_sizes

    state = torch.load(path, weights_only=True)
    del state["item_ids"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt.*item_ids"):
        SemanticIds.load(tmp_path / "broken.pt")

    ids.check_items(torch.arange(40).flip(0))  # order does not matter
    with pytest.raises(ValueError, match=r"ids\.pt: .*3 missing \(e\.g\. \[40, 41, 42\]\), 0 extra"):
        ids.check_items(torch.arange(43), path_hint="ids.pt")
    with pytest.raises(ValueError, match=r"0 missing .*2 extra \(e\.g\. \[38, 39\]\)"):
        ids.check_items(torch.arange(38))


def test_balanced_kmeans_gives_equal_clusters_and_a_shorter_suffix() -> None:
    # one dense blob and a few outliers: plain k-means spends codes on the outliers
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(190, 16, generator=g) * 0.1, torch.randn(10, 16, generator=g) * 5])
    plain, _ = residual_kmeans(x, 2, 8, seed=0)
    balanced, _ = residual_kmeans(x, 2, 8, seed=0, balanced=True)
    for level in range(2):
        sizes = torch.bincount(balanced[:, level], minlength=8)
        assert int(sizes.max() - sizes.min()) <= 1  # 200 / 8 = 25 each
    assert code_stats(balanced, 8).max_collisions < code_stats(plain, 8).max_collisions  # 25 vs 63


def test_for_datamodule_refuses_a_file_that_does_not_cover_the_items(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from recsys.semantic_ids import for_datamodule

    text = torch.nn.functional.normalize(
        torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1
    )
    dm = SimpleNamespace(item_ids=torch.arange(100, 140), metadata=SimpleNamespace(text=text), dataset="toy")
    path = tmp_path / "ids.pt"
    made = for_datamodule(dm, source="text", levels=2, codebook_size=4, path=path)  # built, then saved
    assert path.exists() and torch.equal(for_datamodule(dm, "text", 2, 4, path=path).codes, made.codes)
    other = SimpleNamespace(item_ids=torch.arange(100, 145), metadata=dm.metadata, dataset="toy")
    with pytest.raises(ValueError, match="5 missing"):
        for_datamodule(other, source="text", levels=2, codebook_size=4, path=path)
    with pytest.raises(ValueError, match="no item text"):
        for_datamodule(
            SimpleNamespace(item_ids=dm.item_ids, metadata=SimpleNamespace(text=None), dataset="toy")
        )
