"""M2TRec: an item-ID-free, metadata-aware multi-task Transformer for session-based recommendation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.models.sasrec import CausalEncoder, NextItemScoring, every_item, next_item_loss, shift

PAD = -1  # left padding, as recsys.data.sequences


def category_loss(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Multi-label next-category loss: binary cross-entropy summed over categories, averaged over positions.

    Shalaby et al. "M2TRec: Metadata-aware Multi-task Transformer for Large-scale and Cold-start free
    Session-based Recommendations". RecSys 2022. https://arxiv.org/abs/2209.11824

    .. math::
        \mathcal{L}_{cat} = -\frac{1}{N} \sum_{n} \sum_{c=1}^{C}
            \left[ y_{nc} \log \sigma(z_{nc}) + (1 - y_{nc}) \log (1 - \sigma(z_{nc})) \right]

    with :math:`y_n` the multi-hot category labels of position n's next item (one-hot for single-category
    data).

    Args:
        logits: (N, C) category logits :math:`z_n`.
        labels: (N, C) labels in {0, 1}.

    Returns:
        () mean loss over the N positions.
    """
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
    return bce / logits.shape[0]


class MetadataEncoder(nn.Module):
    r"""Maps an item's metadata (and, optionally, its id) to a d-vector.

    .. math::
        v_i = W_2\, \mathrm{GELU}(W_1 [\, e^{(1)}_{f_{i1}} \,\|\, \dots \,\|\, e^{(F)}_{f_{iF}} \,\|\,
              \bar{b}_i \,\|\, P t_i \,] + c_1) + c_2 \;\; [+\, e^{id}_i]

    Field embeddings are **concatenated** (as in the paper) so the MLP can weigh and combine fields;
    value 0 ("unknown") of a field and of the bag is the zero vector. :math:`\bar{b}_i` is the mean of
    the item's non-zero bag values' embeddings (zero for an empty bag), :math:`P t_i` a linear projection
    of its text vector. Absent parts (no field, an empty bag width, no text) are left out.

    Args:
        vocab_sizes (Sequence[int]): vocabulary size of each categorical field (values ``0..V_f-1``).
        bag_vocab (int): vocabulary size of the multi-valued (bag) values; 0 for no bag.
        text_dim (int): width T of the text vectors; 0 for no text.
        num_items (int): I, the size of the ID table when ``use_item_ids``.
        embedding_dim (int): d, the size of every embedding and of the output.
        use_item_ids (bool): add a learned per-item ID embedding (the hybrid variant).
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        bag_vocab: int,
        text_dim: int,
        num_items: int,
        embedding_dim: int,
        use_item_ids: bool,
    ):
        super().__init__()
        d = embedding_dim
        self.fields = nn.ModuleList(nn.Embedding(v, d, padding_idx=0) for v in vocab_sizes)
        self.bag = nn.Embedding(bag_vocab, d, padding_idx=0) if bag_vocab > 0 else None
        self.text = nn.Linear(text_dim, d) if text_dim > 0 else None
        width = d * (len(self.fields) + (self.bag is not None) + (self.text is not None))
        if width == 0 and not use_item_ids:
            raise ValueError("items need some metadata (fields, bags or text) or use_item_ids=True")
        self.mlp = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d)) if width else None
        self.ids = nn.Embedding(num_items, d) if use_item_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=d**-0.5)

    def forward(self, ids: Tensor, fields: Tensor, bags: Tensor, text: Tensor | None) -> Tensor:
        """Encode n items.

        Args:
            ids: (n,) int64 item ids.
            fields: (n, F) int64 field values.
            bags: (n, B) int64 bag values, 0-padded.
            text: (n, T) float text vectors, or None.

        Returns:
            (n, d) item vectors.
        """
        parts = [table(fields[:, f]) for f, table in enumerate(self.fields)]  # F x (n, d)
        if self.bag is not None:
            count = (bags != 0).sum(1, keepdim=True).clamp(min=1)  # (n, 1)
            parts.append(self.bag(bags).sum(1) / count)  # (n, B, d) -> (n, d); padding rows are zero
        if self.text is not None:
            parts.append(self.text(text))  # (n, d)
        out = self.mlp(torch.cat(parts, dim=1)) if self.mlp is not None else 0.0  # (n, d)
        return out + self.ids(ids) if self.ids is not None else out


class M2TRec(NextItemScoring, nn.Module):
    r"""M2TRec (Shalaby et al., RecSys 2022).

    Shalaby, Oh, Afsharinejad, Kumar, Cui. "M2TRec: Metadata-aware Multi-task Transformer for
    Large-scale and Cold-start free Session-based Recommendations". RecSys 2022.
    https://arxiv.org/abs/2209.11824

    Items are represented by their **metadata only** (:class:`MetadataEncoder`: categorical fields,
    a bag of multi-valued attributes, a text vector), so the model needs no per-item table and scores
    items it never saw in training; ``use_item_ids=True`` adds an ID embedding for data whose metadata
    cannot tell items apart. The session is encoded by a causal pre-LN Transformer with positional
    embeddings (:class:`recsys.models.sasrec.CausalEncoder`, same left-padding rules as SASRec),
    giving :math:`z_1..z_L`; the session state at position t is the running mean of the encodings
    (the paper's average pooling, applied to every prefix) or, with ``pooling="last"``, :math:`z_t`:

    .. math::
        h_t = \frac{1}{t} \sum_{s \le t} z_s, \qquad
        r_{t,i} = h_t^\top v_i, \qquad
        \hat{c}_t = \sigma(W_c h_t + b_c)

    Two tasks share :math:`h_t`: the next item (scores :math:`r_{t,i}` against every item's
    metadata vector :math:`v_i`) and the next item's categories :math:`\hat{c}_t` (multi-hot; the paper
    predicts the primary category and the subcategories). The objective is

    .. math::
        \mathcal{L} = w_{item}\, \mathcal{L}_{item} + w_{cat}\, \mathcal{L}_{cat}

    with :math:`\mathcal{L}_{item}` SASRec's full or sampled softmax
    (:func:`recsys.models.sasrec.next_item_loss`) and :math:`\mathcal{L}_{cat}` :func:`category_loss`;
    :meth:`losses` returns both terms and the caller weighs them. The category head's bias starts at
    :math:`-\log C` (a prior of 1/C per category), so :math:`\mathcal{L}_{cat}` starts near
    :math:`\log C + 1` instead of :math:`C \log 2`.

    The encoder is causal so that one pass trains the next-item prediction of every prefix of a
    session; the paper describes pooling the encodings of the current session, which for a prefix ending
    at t is :math:`h_t` above.

    The metadata tensors are registered as buffers: they move with the module and are saved in its
    state dict. Without gradients, :meth:`item_vectors` is cached until a parameter or buffer changes
    in place (an optimizer step, a metadata edit) or is replaced.

    Args:
        num_items (int): number of items I (ids ``0..I-1``).
        fields (Tensor): (I, F) int64 categorical values, field f in ``0..vocab_sizes[f]-1``, 0 = unknown.
        vocab_sizes (Sequence[int]): vocabulary size of each of the F fields.
        bags (Tensor): (I, B) int64 multi-valued values in ``0..bag_vocab-1``, 0-padded; B may be 0.
        bag_vocab (int): vocabulary size of the bag values.
        text (Tensor | None): (I, T) float32 text vectors, or None.
        num_categories (int): width C of the category labels.
        max_len (int, default 50): the longest session encoded; longer histories keep their last items.
        embedding_dim (int, default 64): size d of every embedding and hidden state.
        num_blocks (int, default 2): Transformer blocks.
        num_heads (int, default 2): attention heads per block (must divide d).
        dropout (float, default 0.2): dropout on the session embeddings, attention and residual branches.
        use_item_ids (bool, default False): add a per-item ID embedding to the metadata vector.
        pooling (str, default "mean"): ``"mean"`` (running mean of the encodings, the paper's) or
            ``"last"`` (the encoding at t, as SASRec).
    """

    uses_metadata = True  # recsys.lit.sequential passes the datamodule's item metadata

    def __init__(
        self,
        num_items: int,
        fields: Tensor,
        vocab_sizes: Sequence[int],
        bags: Tensor,
        bag_vocab: int,
        text: Tensor | None,
        num_categories: int,
        max_len: int = 50,
        embedding_dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        use_item_ids: bool = False,
        pooling: str = "mean",
    ):
        super().__init__()
        _check_metadata(num_items, fields, vocab_sizes, bags, bag_vocab, text)
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.num_items, self.max_len, self.pooling = num_items, max_len, pooling
        self.register_buffer("fields", fields.long())
        self.register_buffer("bags", bags.long())
        self.register_buffer("text", None if text is None else text.float())
        self.item_encoder = MetadataEncoder(
            vocab_sizes,
            bag_vocab if bags.shape[1] > 0 else 0,
            0 if text is None else text.shape[1],
            num_items,
            embedding_dim,
            use_item_ids,
        )
        self.encoder = CausalEncoder(max_len, embedding_dim, num_blocks, num_heads, dropout)
        self.category_head = nn.Linear(embedding_dim, num_categories)
        nn.init.constant_(self.category_head.bias, -math.log(num_categories) if num_categories > 1 else 0.0)
        self._cache: tuple[tuple[int, ...], Tensor] | None = None  # (versions, item vectors)

    def encode_items(self, ids: Tensor | None = None) -> Tensor:
        """Metadata vectors of some items, or all of them.

        Args:
            ids: (...) int64 item ids, or None for every item.

        Returns:
            (..., d) item vectors; (I, d) for None.
        """
        if ids is None:
            flat = torch.arange(self.num_items, device=self.fields.device)  # (I,)
            return self.item_encoder(flat, self.fields, self.bags, self.text)
        flat = ids.reshape(-1)  # (n,)
        text = None if self.text is None else self.text[flat]
        return self.item_encoder(flat, self.fields[flat], self.bags[flat], text).view(*ids.shape, -1)

    def item_vectors(self) -> Tensor:
        """(I, d) every item's vector :math:`v_i`; cached without gradients (see the class docstring)."""
        if torch.is_grad_enabled():
            self._cache = None
            return self.encode_items()
        key = _versions(self)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.encode_items())
        return self._cache[1]

    def _apply(self, fn, recurse: bool = True):
        self._cache = None  # the cached table stays on the old device otherwise
        return super()._apply(fn, recurse)

    def hidden(self, items: Tensor) -> Tensor:
        """Session states :math:`h_t` of a batch.

        Args:
            items: (B, L) int64 item ids, left-padded with ``PAD``, L <= ``max_len``.

        Returns:
            (B, L, d) states; zero at padding positions.
        """
        real = items != PAD  # (B, L)
        x = self.encode_items(items.clamp(min=0)) * real.unsqueeze(-1).to(self.encoder.norm.weight.dtype)
        z = self.encoder(x, real)  # (B, L, d), zero at padding
        if self.pooling == "last":
            return z
        count = real.cumsum(1).clamp(min=1).unsqueeze(-1).to(z.dtype)  # (B, L, 1) real items so far
        return z.cumsum(1) / count  # (B, L, d); leading padding stays zero

    def losses(
        self, items: Tensor, categories: Tensor, num_negatives: int = 0, known: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The two task losses of a training batch, each averaged over the valid positions.

        Args:
            items: (B, L+1) int64 item ids, left-padded with ``PAD``: inputs ``items[:, :-1]``, targets
                ``items[:, 1:]``; a position counts when both are real items.
            categories: (I, C) category labels of every item (multi-hot; bool, int or float).
            num_negatives: 0 for the full softmax over the known items, else K shared uniform negatives
                (:func:`recsys.models.sasrec.next_item_loss`).
            known: (I,) bool, the items in the training catalogue (default: all): cold-start items are
                no negatives.

        Returns:
            ``{"item": (), "category": ()}``: :math:`\\mathcal{L}_{item}` and :math:`\\mathcal{L}_{cat}`.
        """
        inputs, targets = shift(items)  # (B, L), (B, L)
        hidden = self.hidden(inputs)  # (B, L, d)
        known = every_item(self.num_items, items.device) if known is None else known
        item = next_item_loss(hidden, targets, self.encode_items, known, num_negatives)
        valid = targets != PAD  # (B, L)
        h, y = hidden[valid], targets[valid]  # (N, d), (N,)
        if y.numel() == 0:
            return {"item": item, "category": hidden.sum() * 0.0}
        labels = categories.to(h.device)[y]  # (N, C)
        return {"item": item, "category": category_loss(self.category_head(h), labels)}


def _versions(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(identity, in-place version) of each parameter and buffer: a key that changes when any of them does."""
    return tuple(
        (id(t), -1 if t.is_inference() else t._version) for t in (*module.parameters(), *module.buffers())
    )


def _check_metadata(
    num_items: int,
    fields: Tensor,
    vocab_sizes: Sequence[int],
    bags: Tensor,
    bag_vocab: int,
    text: Tensor | None,
) -> None:
    """Raise ``ValueError`` on metadata whose shapes or values do not fit the counts."""
    if fields.dim() != 2 or fields.shape != (num_items, len(vocab_sizes)):
        raise ValueError(f"fields must be ({num_items}, {len(vocab_sizes)}), got {tuple(fields.shape)}")
    for f, v in enumerate(vocab_sizes):
        col = fields[:, f]
        if num_items and (col.min() < 0 or col.max() >= v):
            raise ValueError(f"field {f} has values outside [0, {v})")
    if bags.dim() != 2 or bags.shape[0] != num_items:
        raise ValueError(f"bags must be ({num_items}, B), got {tuple(bags.shape)}")
    if bags.numel() and (bags.min() < 0 or bags.max() >= bag_vocab):
        raise ValueError(f"bags have values outside [0, {bag_vocab})")
    if text is not None and (text.dim() != 2 or text.shape[0] != num_items):
        raise ValueError(f"text must be ({num_items}, T), got {tuple(text.shape)}")
