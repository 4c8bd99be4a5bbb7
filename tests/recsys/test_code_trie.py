"""CodeTrie: every item reachable, masks equal to brute force, exclusions of prefixes and leaves."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from recsys.code_trie import CodeTrie
from recsys.semantic_ids import disambiguate


def _random_codes(num_items: int = 50, seed: int = 0) -> Tensor:
    """(I, 3) unique tuples: two random levels over a vocabulary of 3, then the suffix."""
    g = torch.Generator().manual_seed(seed)
    return disambiguate(torch.randint(3, (num_items, 2), generator=g))


def _walk(trie: CodeTrie, codes: Tensor) -> Tensor:
    nodes = trie.root(codes.shape[0], codes.device)
    for level in range(codes.shape[1]):
        nodes = trie.step(level, nodes, codes[:, level])
    return trie.items(nodes)


def test_trie_walks_every_item() -> None:
    codes = _random_codes()
    trie = CodeTrie(codes)
    assert trie.num_valid_items == 50 and torch.equal(trie.item_codes, codes)
    assert torch.equal(_walk(trie, codes), torch.arange(50))
    assert torch.equal(trie.leaf_item[trie.leaf_of_items], torch.arange(50))


def _brute_force_allowed(codes: Tensor, valid: list[int], prefix: tuple[int, ...], vocab: int) -> Tensor:
    """(vocab,) bool: tokens t with a valid item whose codes start with prefix + (t,)."""
    mask = torch.zeros(vocab, dtype=torch.bool)
    for i in valid:
        if tuple(codes[i, : len(prefix)].tolist()) == prefix:
            mask[codes[i, len(prefix)]] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("restrict", [False, True])
def test_trie_masks_match_brute_force(seed: int, restrict: bool) -> None:
    codes = _random_codes(seed=seed)  # (50, 3)
    g = torch.Generator().manual_seed(seed)
    allowed_items = torch.rand(50, generator=g) < 0.6 if restrict else None
    trie = CodeTrie(codes, allowed_items)
    in_trie = allowed_items.nonzero().squeeze(1).tolist() if restrict else list(range(50))
    assert trie.num_valid_items == len(in_trie)
    excluded_all = torch.rand(len(in_trie) + 1, 50, generator=g) < 0.5  # one random exclusion per beam
    for level in range(3):
        prefixes = sorted({tuple(codes[i, :level].tolist()) for i in in_trie})
        nodes = trie.root(len(prefixes))
        for lv in range(level):
            nodes = trie.step(lv, nodes, torch.tensor([p[lv] for p in prefixes]))
        vocab = trie.vocab_sizes[level]
        expected = torch.stack([_brute_force_allowed(codes, in_trie, p, vocab) for p in prefixes])
        assert torch.equal(trie.allowed(level, nodes), expected)

        excluded = excluded_all[: len(prefixes)]
        left = [[i for i in in_trie if not excluded[r, i]] for r in range(len(prefixes))]
        expected = torch.stack(
            [_brute_force_allowed(codes, left[r], p, vocab) for r, p in enumerate(prefixes)]
        )
        assert torch.equal(trie.allowed(level, nodes, excluded), expected)


def test_trie_excludes_whole_prefixes_and_leaves() -> None:
    codes = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 2, 0]])
    trie = CodeTrie(codes)
    root = trie.root(1)
    excluded = torch.zeros(1, 5, dtype=torch.bool)
    assert trie.allowed(0, root, excluded).tolist() == [[True, True]]
    excluded[0, [3, 4]] = True  # everything under token 1
    assert trie.allowed(0, root, excluded).tolist() == [[True, False]]
    node = trie.step(1, trie.step(0, root, torch.tensor([0])), torch.tensor([1]))  # prefix (0, 1)
    assert trie.allowed(2, node).tolist() == [[True, True]]
    excluded[0, 2] = True  # the leaf (0, 1, 1)
    assert trie.allowed(2, node, excluded).tolist() == [[True, False]]
    excluded[0, 1] = True  # and (0, 1, 0): now prefix (0, 1) is blocked one level up
    assert trie.allowed(1, trie.step(0, root, torch.tensor([0])), excluded).tolist() == [[True, False, False]]


def test_trie_allowed_items_and_invalid_steps() -> None:
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 0]])
    trie = CodeTrie(codes, allowed_items=torch.tensor([True, False, True, False]), vocab_sizes=(4, 3))
    assert trie.num_valid_items == 2 and trie.leaf_of_items.tolist() == [0, -1, 1, -1]
    root = trie.root(2)
    assert trie.allowed(0, root).tolist() == [[True, True, False, False]] * 2
    assert trie.allowed(1, trie.step(0, root[:1], torch.tensor([0]))).tolist() == [[True, False, False]]
    assert torch.equal(_walk(trie, codes[[2, 0]]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="lead to no item"):
        trie.step(0, root, torch.tensor([0, 2]))  # item 3 is not allowed
    with pytest.raises(ValueError, match="lead to no item"):
        trie.step(0, root, torch.tensor([0, 7]))  # out of the vocabulary
    with pytest.raises(ValueError, match="disambiguate"):
        CodeTrie(torch.tensor([[0, 1], [0, 1]]))
    moved = trie.to("cpu")
    assert torch.equal(_walk(moved, codes[[0]]), torch.tensor([0]))
