"""SASRec: next-item prediction with a causal self-attention encoder over the item sequence."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.eval.topk import topk_with_id_ties

PAD = -1  # left padding, as recsys.data.sequences


def shift(items: Tensor) -> tuple[Tensor, Tensor]:
    """Split a training batch into inputs and next-item targets.

    Args:
        items: (B, L+1) int64 item ids, left-padded with ``PAD``.

    Returns:
        (inputs, targets): (B, L) each; ``inputs = items[:, :-1]`` and ``targets = items[:, 1:]``, with the
        target set to ``PAD`` wherever the input is ``PAD``, so that ``targets != PAD`` marks exactly the
        positions that count in the loss (both input and target are real items).
    """
    inputs, targets = items[:, :-1], items[:, 1:]  # (B, L), (B, L)
    return inputs, targets.masked_fill(inputs == PAD, PAD)


def softmax_loss(hidden: Tensor, item_table: Tensor, targets: Tensor, known: Tensor | None = None) -> Tensor:
    r"""Full-softmax cross-entropy of the next item over the training catalogue.

    Klenitskiy, Vasilev. "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?".
    RecSys 2023. https://arxiv.org/abs/2309.07602 (SASRec trained with this loss instead of the
    paper's binary cross-entropy against one sampled negative).

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{n} \log
            \frac{\exp(h_n^\top e_{y_n})}{\sum_{j \in \mathcal{K}} \exp(h_n^\top e_j)}

    with :math:`\mathcal{K}` the items known at training time (all of them by default; items held out
    as cold start are not in the catalogue a deployed model trains against, so they are no negatives).

    Args:
        hidden: (N, d) hidden states :math:`h_n` of the valid positions.
        item_table: (I, d) item vectors :math:`e_j`.
        targets: (N,) int64 next items :math:`y_n`, all in :math:`\mathcal{K}`.
        known: (I,) bool :math:`\mathcal{K}`, or None for every item.

    Returns:
        () mean loss.
    """
    logits = hidden @ item_table.T  # (N, I)
    if known is not None:
        logits = logits.masked_fill(~known, float("-inf"))
    return F.cross_entropy(logits, targets)


def sampled_softmax_loss(
    hidden: Tensor, positives: Tensor, negatives: Tensor, targets: Tensor, negative_ids: Tensor
) -> Tensor:
    r"""Sampled softmax: the target against K negatives shared by every position (no logQ correction).

    Jean, Cho, Memisevic, Bengio. "On Using Very Large Target Vocabulary for Neural Machine
    Translation". ACL 2015. https://arxiv.org/abs/1412.2007 ; for SASRec, Klenitskiy & Vasilev,
    RecSys 2023 (https://arxiv.org/abs/2309.07602).

    .. math::
        \mathcal{L} = -\frac{1}{N} \sum_{n} \log
            \frac{\exp(h_n^\top e_{y_n})}
                 {\exp(h_n^\top e_{y_n}) + \sum_{k:\, j_k \ne y_n} \exp(h_n^\top e_{j_k})}

    A negative that equals the position's target is dropped from its denominator (logit
    :math:`-\infty`), so the target is never its own negative.

    Args:
        hidden: (N, d) hidden states :math:`h_n` of the valid positions.
        positives: (N, d) vectors :math:`e_{y_n}` of their targets.
        negatives: (K, d) vectors :math:`e_{j_k}` of the shared negatives.
        targets: (N,) int64 target ids :math:`y_n`.
        negative_ids: (K,) int64 negative ids :math:`j_k`.

    Returns:
        () mean loss.
    """
    pos = (hidden * positives).sum(-1, keepdim=True)  # (N, 1)
    neg = hidden @ negatives.T  # (N, K)
    neg = neg.masked_fill(negative_ids[None, :] == targets[:, None], float("-inf"))  # (N, K)
    logits = torch.cat([pos, neg], dim=1)  # (N, 1+K)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def next_item_loss(
    hidden: Tensor,
    targets: Tensor,
    encode_items: Callable[[Tensor | None], Tensor],
    known: Tensor,
    num_negatives: int = 0,
) -> Tensor:
    """Next-item loss over the valid positions: :func:`softmax_loss` or :func:`sampled_softmax_loss`.

    Args:
        hidden: (B, L, d) hidden states.
        targets: (B, L) int64 next items, ``PAD`` where the position does not count (see :func:`shift`).
        encode_items: maps (n,) item ids to (n, d) item vectors, and ``None`` to all (I, d) vectors.
        known: (I,) bool, the items known at training time: the softmax's catalogue and the pool the
            negatives are drawn from (cold-start items are left out).
        num_negatives: 0 for the full softmax, else K negatives drawn uniformly from the known items (with
            replacement, from the global RNG) once per call and shared by every position.

    Returns:
        () mean loss over the valid positions; 0 (with a gradient path) when there is none.
    """
    valid = targets != PAD  # (B, L)
    h, y = hidden[valid], targets[valid]  # (N, d), (N,)
    if y.numel() == 0:
        return hidden.sum() * 0.0
    if num_negatives == 0:
        return softmax_loss(h, encode_items(None), y, known)
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    pool = known.nonzero().squeeze(1)  # (|K|,)
    negative_ids = pool[torch.randint(pool.numel(), (num_negatives,), device=pool.device)]  # (K,)
    vectors = encode_items(torch.cat([y, negative_ids]))  # (N+K, d)
    return sampled_softmax_loss(h, vectors[: y.numel()], vectors[y.numel() :], y, negative_ids)


def every_item(num_items: int, device: torch.device) -> Tensor:
    """(I,) bool, all true: a training catalogue without held-out items."""
    return torch.ones(num_items, dtype=torch.bool, device=device)


class CausalBlock(nn.Module):
    r"""A pre-LN Transformer block with causal, padding-aware self-attention.

    .. math::
        x \leftarrow x + \mathrm{Drop}(\mathrm{MHA}(\mathrm{LN}(x))), \qquad
        x \leftarrow x + \mathrm{Drop}(W_2\, \mathrm{ReLU}(W_1\, \mathrm{LN}(x)))

    The feed-forward network keeps the width d, as in SASRec's point-wise FFN.

    Args:
        embedding_dim (int): d, divisible by ``num_heads``.
        num_heads (int): attention heads.
        dropout (float): dropout on attention weights and on both residual branches.
    """

    def __init__(self, embedding_dim: int, num_heads: int, dropout: float):
        super().__init__()
        if embedding_dim % num_heads:
            raise ValueError(f"embedding_dim {embedding_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(embedding_dim), nn.LayerNorm(embedding_dim)
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.out = nn.Linear(embedding_dim, embedding_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(embedding_dim, embedding_dim),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """One block.

        Args:
            x: (B, L, d) inputs.
            allowed: (B, 1, L, L) bool, True where query position t may attend to key position s.

        Returns:
            (B, L, d) outputs.
        """
        B, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d/H) each
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, L, d/H)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class CausalEncoder(nn.Module):
    r"""Positional embeddings, :class:`CausalBlock` s and a final LayerNorm over left-padded sequences.

    **Positions are counted from the right**: the last column has position 0, the one before it 1, and
    so on. With left padding this is SASRec's layout (sequences padded to ``max_len``, the latest item
    always in the last slot) and it makes the output of a real position independent of how much
    padding precedes the sequence.

    **Padding.** A real position attends to the real positions at or before it; a padding position
    attends only to itself (never to a real item), so no attention row is empty and no NaN appears,
    even for an all-padding row. Padding outputs are set to zero after the final LayerNorm, so an
    all-padding history has the zero vector as its hidden state (every item scores 0).

    Args:
        max_len (int): the longest sequence, the number of positional embeddings.
        embedding_dim (int): d.
        num_blocks (int): number of Transformer blocks.
        num_heads (int): attention heads per block.
        dropout (float): dropout on the input embeddings and inside the blocks.
    """

    def __init__(self, max_len: int, embedding_dim: int, num_blocks: int, num_heads: int, dropout: float):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, embedding_dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(embedding_dim, num_heads, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(embedding_dim)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """Encode a batch of embedded sequences.

        Args:
            x: (B, L, d) input embeddings, L <= ``max_len``.
            real: (B, L) bool, True at real (non-padding) positions.

        Returns:
            (B, L, d) hidden states, zero at padding positions.
        """
        B, L, _ = x.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.max_len}")
        positions = torch.arange(L - 1, -1, -1, device=x.device)  # (L,) distance from the last column
        x = self.drop(x + self.position(positions))  # (B, L, d)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # (L, L) key s <= query t
        eye = torch.eye(L, dtype=torch.bool, device=x.device)  # (L, L)
        allowed = (causal & real[:, None, :]) | eye  # (B, L, L): real keys at or before t, and t itself
        allowed = allowed.unsqueeze(1)  # (B, 1, L, L) broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x) * real.unsqueeze(-1).to(x.dtype)  # (B, L, d)


class NextItemScoring:
    """``score_histories`` and ``recommend`` for a net with ``hidden(items)``, ``item_vectors()`` and
    ``max_len`` (SASRec, M2TRec): the next item after a history is scored by the last hidden state."""

    def score_histories(self, histories: Tensor) -> Tensor:
        """Scores of every item as the next one after each history.

        Args:
            histories: (N, L) int64 item ids, left-padded with ``PAD``; only the last ``max_len`` columns
                are read.

        Returns:
            (N, I) scores; an all-padding history scores every item 0.
        """
        h = self.hidden(histories[:, -self.max_len :])[:, -1]  # (N, d): the last column, left padding
        return h @ self.item_vectors().T

    @torch.no_grad()
    def recommend(self, histories: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """The top-``k`` next items for each history, best first, ties broken by lower item id.

        Args:
            histories: (N, L) int64 item ids, left-padded with ``PAD``.
            k: number of items.
            exclude: optional (N, I) bool mask of items never to recommend.

        Returns:
            (N, k) int64 item ids; ``-1`` pads a row with fewer than ``k`` candidates.
        """
        scores = self.score_histories(histories)  # (N, I)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        return topk_with_id_ties(scores.float(), k)[1]


class SASRec(NextItemScoring, nn.Module):
    r"""SASRec (Kang & McAuley, ICDM 2018).

    Kang, McAuley. "Self-Attentive Sequential Recommendation". ICDM 2018.
    https://arxiv.org/abs/1808.09781

    Each item :math:`s_t` of the sequence is embedded, scaled and given a positional embedding, then
    encoded by causal pre-LN Transformer blocks (:class:`CausalEncoder`); the hidden state at position
    t scores every item as the next one with the shared item embeddings:

    .. math::
        x_t = \sqrt{d}\, e_{s_t} + p_t, \qquad
        h_t = \mathrm{LN}(\mathrm{Blocks}(x)_t), \qquad
        r_{t,i} = h_t^\top e_i

    Training (:meth:`loss`) uses the full softmax over all items (:func:`softmax_loss`) or a sampled
    softmax over shared uniform negatives (:func:`sampled_softmax_loss`), not the paper's binary
    cross-entropy. Sequences are **left-padded** with ``PAD = -1``; positions are counted from the right
    (see :class:`CausalEncoder`), so extra left padding changes no score. Attention is standard pre-LN
    (queries, keys and values from the normalised input; the released code normalises only the queries).

    Args:
        num_items (int): number of items I (ids ``0..I-1``).
        max_len (int, default 50): the longest sequence the model encodes; :meth:`score_histories` keeps
            the last ``max_len`` items of longer histories.
        embedding_dim (int, default 64): size d of item vectors and hidden states.
        num_blocks (int, default 2): number of Transformer blocks.
        num_heads (int, default 1): attention heads per block (must divide d).
        dropout (float, default 0.2): dropout rate on embeddings, attention and residual branches.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.num_items, self.max_len, self.embedding_dim = num_items, max_len, embedding_dim
        self.item = nn.Embedding(num_items + 1, embedding_dim, padding_idx=num_items)  # last row: padding
        nn.init.normal_(self.item.weight, std=embedding_dim**-0.5)  # unit-variance inputs after sqrt(d)
        with torch.no_grad():
            self.item.weight[num_items].zero_()
        self.encoder = CausalEncoder(max_len, embedding_dim, num_blocks, num_heads, dropout)

    def item_vectors(self) -> Tensor:
        """(I, d) item vectors :math:`e_i` (the padding row left out)."""
        return self.item.weight[: self.num_items]

    def _encode_items(self, ids: Tensor | None) -> Tensor:
        """(n, d) vectors of ``ids`` (n,), or all (I, d) for ``None``."""
        return self.item_vectors() if ids is None else self.item(ids)

    def hidden(self, items: Tensor) -> Tensor:
        """Hidden states of a batch of sequences.

        Args:
            items: (B, L) int64 item ids, left-padded with ``PAD``, L <= ``max_len``.

        Returns:
            (B, L, d) hidden states; zero at padding positions.
        """
        real = items != PAD  # (B, L)
        x = self.item(items.masked_fill(~real, self.num_items)) * math.sqrt(self.embedding_dim)  # (B, L, d)
        return self.encoder(x, real)

    def loss(self, items: Tensor, num_negatives: int = 0, known: Tensor | None = None) -> Tensor:
        r"""Next-item loss of a training batch, averaged over the valid positions.

        With ``num_negatives == 0``, the full softmax (:func:`softmax_loss`):

        .. math::
            \mathcal{L} = -\frac{1}{|V|} \sum_{(b,t) \in V} \log
                \frac{\exp(h_{bt}^\top e_{y_{bt}})}{\sum_{j=1}^{I} \exp(h_{bt}^\top e_j)}

        With ``num_negatives = K > 0``, a sampled softmax (:func:`sampled_softmax_loss`) against K
        uniform negatives :math:`j_1..j_K` drawn once per batch and shared by every position, a negative
        equal to the target being dropped:

        .. math::
            \mathcal{L} = -\frac{1}{|V|} \sum_{(b,t) \in V} \log
                \frac{\exp(h_{bt}^\top e_{y_{bt}})}
                     {\exp(h_{bt}^\top e_{y_{bt}}) + \sum_{k:\, j_k \ne y_{bt}} \exp(h_{bt}^\top e_{j_k})}

        V is the set of positions whose input and target are both real items.

        Args:
            items: (B, L+1) int64 item ids, left-padded with ``PAD``: inputs ``items[:, :-1]``, targets
                ``items[:, 1:]``.
            num_negatives: 0 for the full softmax, else K.
            known: (I,) bool, the items in the training catalogue (default: all); see
                :func:`next_item_loss`.

        Returns:
            () mean loss.
        """
        inputs, targets = shift(items)  # (B, L), (B, L)
        known = every_item(self.num_items, items.device) if known is None else known
        return next_item_loss(self.hidden(inputs), targets, self._encode_items, known, num_negatives)
