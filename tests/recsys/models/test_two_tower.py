import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.feature_masking import correlated_feature_masking, field_mutual_information
from recsys.models.two_tower import (
    StreamingFrequency,
    Tower,
    TwoTower,
    in_batch_softmax_loss,
    info_nce,
)

VOCABS = [5, 7, 11]


def _fields(batch: int, vocabs: list[int] = VOCABS, lengths: tuple[int, ...] = (1, 3, 4), seed: int = 0):
    """Random padded id tensors, (B, L_f) per field, with some padding (id 0) in the multi-valued ones."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(v, (batch, n), generator=g) for v, n in zip(vocabs, lengths, strict=True)]


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("hidden_dims", [[], [16], [16, 8]])
def test_tower_shapes_and_unit_norm(batch: int, hidden_dims: list[int]) -> None:
    tower = Tower(VOCABS, embedding_dim=4, hidden_dims=hidden_dims, output_dim=5)
    out = tower(_fields(batch))
    assert out.shape == (batch, 5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(batch))


def test_two_tower_shapes() -> None:
    net = TwoTower([3, 4], VOCABS, embedding_dim=4, hidden_dims=[8], output_dim=6)
    queries = net.encode_queries(_fields(5, [3, 4], (1, 2)))
    items = net.encode_items(_fields(7))
    assert queries.shape == (5, 6) and items.shape == (7, 6)
    assert net.score(queries, items).shape == (5, 7)
    paired = net(_fields(5, [3, 4], (1, 2)), _fields(5))
    assert paired.shape == (5,)
    torch.testing.assert_close(paired, net.score(queries, net.encode_items(_fields(5))).diagonal())


def test_padding_is_excluded_from_the_mean() -> None:
    tower = Tower([6], embedding_dim=4, hidden_dims=[], output_dim=4)
    padded = tower([torch.tensor([[2, 3, 0, 0]])])
    tight = tower([torch.tensor([[2, 3]])])
    torch.testing.assert_close(padded, tight)


def test_masking_zeroes_fields() -> None:
    torch.manual_seed(0)
    tower = Tower(VOCABS, embedding_dim=4, hidden_dims=[16], output_dim=8)
    fields = _fields(6)
    full = tower(fields)
    torch.testing.assert_close(tower(fields, torch.ones(3, dtype=torch.bool)), full)  # all kept == no mask
    keep = torch.tensor([True, False, True])
    masked = tower(fields, keep)
    assert not torch.allclose(masked, full, atol=1e-3)  # the mask really changes the output
    # a dropped field is ignored: changing its ids changes nothing, and it equals an all-padding field
    other = [fields[0], _fields(6, seed=1)[1], fields[2]]
    torch.testing.assert_close(tower(other, keep), masked)
    empty = [fields[0], torch.zeros_like(fields[1]), fields[2]]
    torch.testing.assert_close(tower(empty), masked)
    # per-example (B, F) masks: each row as its own (F,) mask
    rows = torch.tensor([[True, True, True], [True, False, True]]).repeat(3, 1)  # (6, 3)
    per_row = tower(fields, rows)
    torch.testing.assert_close(per_row[0::2], full[0::2])
    torch.testing.assert_close(per_row[1::2], masked[1::2])


def test_logq_correction_follows_the_formula() -> None:
    query = torch.eye(2)
    item = torch.eye(2)
    log_q = torch.log(torch.tensor([0.5, 0.25]))
    loss = in_batch_softmax_loss(query, item, log_q, temperature=1.0)
    # corrected logits: row 0 = [1 - log .5, 0 - log .25], row 1 = [0 - log .5, 1 - log .25]
    row0 = -(1 - math.log(0.5)) + math.log(math.exp(1 - math.log(0.5)) + math.exp(-math.log(0.25)))
    row1 = -(1 - math.log(0.25)) + math.log(math.exp(-math.log(0.5)) + math.exp(1 - math.log(0.25)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    uncorrected = in_batch_softmax_loss(query, item, None, temperature=1.0)
    assert uncorrected.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    assert loss.item() != pytest.approx(uncorrected.item())
    # only relative probabilities matter: a common shift of log q leaves the loss unchanged
    shifted = in_batch_softmax_loss(query, item, log_q - 3.0, temperature=1.0)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_temperature_scales_the_logits() -> None:
    g = torch.Generator().manual_seed(0)
    q, i = (
        F.normalize(torch.randn(4, 3, generator=g), dim=-1),
        F.normalize(torch.randn(4, 3, generator=g), dim=-1),
    )
    expected = F.cross_entropy(q @ i.T / 0.2, torch.arange(4))
    torch.testing.assert_close(in_batch_softmax_loss(q, i, temperature=0.2), expected)


def test_duplicate_positives_are_not_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    query, item = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    item_ids = torch.tensor([5, 5, 7])
    logits = query @ item.T
    expected = torch.stack(
        [
            -torch.log_softmax(logits[0, [0, 2]], 0)[0],  # column 1 is item 5 again: dropped
            -torch.log_softmax(logits[1, [1, 2]], 0)[0],
            -torch.log_softmax(logits[2], 0)[2],
        ]
    ).mean()
    loss = in_batch_softmax_loss(query, item, None, temperature=1.0, item_ids=item_ids)
    torch.testing.assert_close(loss, expected)
    assert loss < in_batch_softmax_loss(query, item, None, temperature=1.0)
    # identical duplicate embeddings: no penalty for ranking the duplicate as high as the positive
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    dup = in_batch_softmax_loss(same, same, None, temperature=1.0, item_ids=torch.tensor([3, 3]))
    assert dup.item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce_is_the_one_directional_paper_loss() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = (
        F.normalize(torch.randn(5, 4, generator=g), dim=-1),
        F.normalize(torch.randn(5, 4, generator=g), dim=-1),
    )
    expected = -torch.log_softmax(a @ b.T / 0.1, dim=1).diagonal().mean()
    torch.testing.assert_close(info_nce(a, b, 0.1), expected)
    assert info_nce(a, b, 0.1).item() != pytest.approx(info_nce(b, a, 0.1).item())  # not symmetrised
    views = F.normalize(torch.eye(5, 4 + 1)[:, :5], dim=-1)  # distinct unit vectors
    assert info_nce(views, views, 0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_streaming_frequency_converges_to_true_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    num_items, batch = 40, 32
    weights = 1.0 / torch.arange(1, num_items + 1).double()  # Zipf
    q = weights / weights.sum()
    p_batch = 1 - (1 - q) ** batch  # probability that an item appears in a batch of ``batch`` draws
    freq = StreamingFrequency(num_buckets=1 << 16, alpha=0.005, num_hashes=2)
    for step in range(1, 6001):
        freq.update(torch.multinomial(q, batch, replacement=True, generator=g), step)
    estimate = freq.log_probability(torch.arange(num_items)).double().exp()
    relative_error = (estimate - p_batch).abs() / p_batch
    assert relative_error.max().item() < 0.2, relative_error
    assert relative_error.mean().item() < 0.06


def test_streaming_frequency_hashing_and_state() -> None:
    freq = StreamingFrequency(num_buckets=1 << 10, alpha=0.5)
    assert freq.log_probability(torch.tensor([3])).item() == 0.0  # never seen: probability 1
    freq.update(torch.tensor([3, 3, 9]), step=2)  # duplicates count once; first gap initialises B
    freq.update(torch.tensor([3]), step=6)
    # item 3: B = 2, then 0.5 * 2 + 0.5 * (6 - 2) = 3 -> p = 1/3; item 9: B = 2 -> p = 1/2
    torch.testing.assert_close(
        freq.log_probability(torch.tensor([3, 9])), torch.log(torch.tensor([1 / 3, 1 / 2]))
    )
    restored = StreamingFrequency(num_buckets=1 << 10, alpha=0.5)
    restored.load_state_dict(freq.state_dict())
    torch.testing.assert_close(
        restored.log_probability(torch.tensor([3, 9])), freq.log_probability(torch.tensor([3, 9]))
    )
    with pytest.raises(ValueError, match="step must increase"):
        freq.update(torch.tensor([3]), step=6)
    with pytest.raises(ValueError, match="got 5 after 6"):  # the loaded state's step, not 0
        restored.update(torch.tensor([3]), step=5)
    restored.update(torch.tensor([3, 3]), step=8)  # 0.5 * 3 + 0.5 * 2 = 2.5, whatever the duplicates
    assert restored.log_probability(torch.tensor([3])).item() == pytest.approx(-math.log(2.5))
    # collisions only overestimate: with one bucket every item shares item 0's short gap
    shared = StreamingFrequency(num_buckets=1, alpha=1.0)
    for step in range(1, 5):
        shared.update(torch.tensor([step % 2]), step)
    assert shared.log_probability(torch.tensor([0, 1])).tolist() == [0.0, 0.0]


def _planted(
    batch: int, groups: int, g: torch.Generator
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Users of group k like items of group k; the group is encoded in the features (ids 1..groups)."""
    group = torch.randint(groups, (batch,), generator=g)
    user_fields = [
        (group + 1).unsqueeze(1),  # (B, 1) the user's group
        torch.randint(1, 9, (batch, 2), generator=g),  # (B, 2) noise
    ]
    item_ids = group * 50 + torch.randint(50, (batch,), generator=g)
    genres = torch.stack([group + 1, torch.randint(0, groups + 1, (batch,), generator=g)], dim=1)  # (B, 2)
    item_fields = [genres, (item_ids + 1).unsqueeze(1)]  # multi-valued "genres" with noise; an item id field
    return user_fields, item_fields, item_ids, group


def test_training_learns_a_planted_structure() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    groups, batch = 8, 64
    net = TwoTower(
        [groups + 1, 9], [groups + 1, groups * 50 + 1], embedding_dim=8, hidden_dims=[16], output_dim=8
    )
    freq = StreamingFrequency(num_buckets=1 << 12)
    codes = torch.cat([_planted(256, groups, g)[1][0][:, :1], torch.randint(9, (256, 1), generator=g)], 1)
    mi = field_mutual_information(codes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(1, 151):
        users, items, item_ids, _ = _planted(batch, groups, g)
        freq.update(item_ids, step)
        query, item = net.encode_queries(users), net.encode_items(items)
        loss = in_batch_softmax_loss(query, item, freq.log_probability(item_ids), 0.1, item_ids)
        keep_a, keep_b = correlated_feature_masking(mi, g)
        loss = loss + 0.1 * info_nce(net.encode_items(items, keep_a), net.encode_items(items, keep_b), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        users, items, item_ids, group = _planted(batch, groups, g)
        top = net.score(net.encode_queries(users), net.encode_items(items)).argmax(1)  # (B,)
    group_accuracy = (group[top] == group).float().mean().item()
    chance = ((group[:, None] == group[None, :]).float().mean(1)).mean().item()  # ~ 1/groups
    logging.getLogger(__name__).info("group accuracy %.3f, chance %.3f", group_accuracy, chance)
    assert group_accuracy > 0.8 > 4 * chance
    # exact in-batch hits: the best possible is 1 / (same-group items in the batch) per row
    assert (top == torch.arange(batch)).float().mean().item() > 3 / batch


def test_bad_input_raises_clearly() -> None:
    tower = Tower(VOCABS, embedding_dim=4, hidden_dims=[], output_dim=4)
    fields = _fields(3)
    with pytest.raises(ValueError, match="expected 3 feature fields"):
        tower(fields[:2])
    with pytest.raises(ValueError, match=r"field 1: ids must be in \[0, 7\)"):
        tower([fields[0], fields[1] + 7, fields[2]])
    with pytest.raises(ValueError, match="field 2: expected a"):
        tower([fields[0], fields[1], fields[2][:2]])
    with pytest.raises(ValueError, match="keep must be a bool"):
        tower(fields, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool"):
        tower(fields, torch.ones(3))
    with pytest.raises(ValueError, match="vocab_sizes"):
        Tower([5, 1])
    with pytest.raises(ValueError, match=r"log_q must be \(2,\)"):
        in_batch_softmax_loss(torch.eye(2), torch.eye(2), torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.eye(2), torch.eye(2), 0.0)
    with pytest.raises(ValueError, match="alpha"):
        StreamingFrequency(alpha=0.0)
    net = TwoTower(VOCABS, VOCABS, embedding_dim=4, hidden_dims=[], output_dim=4)
    with pytest.raises(ValueError, match=r"field 2: ids must be in \[0, 11\)"):  # once, any device
        net.set_features(fields, [fields[0], fields[1], fields[2] + 11])


def test_full_ranking_from_stored_features() -> None:
    """score_all and embeddings() agree with encoding the rows one by one, chunked or not."""
    torch.manual_seed(0)
    net = TwoTower([5, 4], [6, 3], embedding_dim=4, hidden_dims=[8], output_dim=4)
    with pytest.raises(RuntimeError, match="set_features"):
        net.embeddings()
    users = [torch.randint(0, 5, (7, 2)), torch.randint(0, 4, (7, 1))]
    items = [torch.randint(0, 6, (9, 3)), torch.randint(0, 3, (9, 1))]
    net.set_features(users, items)
    u, i = net.embeddings()
    assert u.shape == (7, 4) and i.shape == (9, 4)
    torch.testing.assert_close(net.encode_all("item", chunk=2), i)
    rows = torch.tensor([6, 0, 3])
    expected = net.encode_queries([f[rows] for f in users]) @ net.encode_items(items).T
    torch.testing.assert_close(net.score_all(rows), expected)
    assert "user_field_0" not in net.state_dict()  # data, not weights


def test_evaluation_reuses_the_encoded_items_until_a_parameter_changes() -> None:
    net = TwoTower([5], [6], embedding_dim=4, hidden_dims=[8], output_dim=4)
    net.set_features([torch.randint(0, 5, (7, 2))], [torch.randint(0, 6, (9, 3))])
    with torch.no_grad():
        first = net.encode_all("item")
        assert net.encode_all("item").data_ptr() == first.data_ptr()  # reused
        net.item_tower.mlp[0].weight.add_(1.0)  # an optimizer step changes a parameter in place
        assert not torch.equal(net.encode_all("item"), first)
    assert net.encode_all("item").requires_grad  # with gradients: always encoded afresh
