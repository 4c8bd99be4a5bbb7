r"""OneRec-style generative recommender: semantic-ID tokens, an encoder-decoder with sparse MoE
feed-forward blocks, session-wise list generation by trie-constrained beam search.

Deng et al., "OneRec: Unifying Retrieve and Rank with Generative Recommender and Iterative
Preference Alignment", 2025. Every item is a tuple of ``D`` semantic-ID tokens
(:mod:`recsys.semantic_ids`: residual k-means levels plus a disambiguation suffix). The encoder
reads the user's history, one vector per item, the sum of its code embeddings

.. math::
    x_i = \sum_{p < D} E_p[c_{i,p}] + P_{pos},

through bidirectional Transformer blocks. The decoder generates the next ``N`` items as one
token stream :math:`c_{1,1} \dots c_{1,D}\, c_{2,1} \dots c_{N,D}` (session-wise generation),
each block being causal self-attention, cross-attention to the history and a feed-forward block
that is a sparse mixture of experts (:class:`~recsys.models.moe.SparseMoE`: a top-k, hash or COMET
tree gate, a load-balancing loss, expert capacity) or, for the control, a dense feed-forward block with the
same active parameters (:class:`~recsys.models.moe.DenseFFN`). Position ``t`` predicts a token
of level ``t mod D``; its softmax runs over that level's codebook only. Training minimises

.. math::
    \mathcal{L}_{NTP} = -\frac{1}{T}\sum_t \log p(c_t \mid c_{<t}, \text{history})

over the real tokens of the future items (shorter futures are padded and not counted).

Generation (:meth:`OneRec.beam_search`, :meth:`OneRec.sample`) walks a
:class:`~recsys.code_trie.CodeTrie`: at every step only tokens that continue a real item are
allowed, and an item already in the list is blocked, so every generated code is a real item
and a list has no duplicates. Decoding caches the self-attention keys and values of the prefix and
the cross-attention keys and values of the history, so each step costs one position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.code_trie import CodeTrie
from recsys.models.gates import GATES
from recsys.models.moe import DenseFFN, RoutingStats, SparseMoE, dense_hidden_for

PAD = -1
NEG = -1e9  # score of an item a generation did not produce (finite: the harness sorts it last)


class Attention(nn.Module):
    """Multi-head attention with separable key/value projection, so keys and values can be cached."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding_dim {dim} must be divisible by num_heads {num_heads}")
        self.heads, self.dropout = num_heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, d/H)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, d) -> keys, values (B, H, S, d/H)."""
        return self._split(self.k(x)), self._split(self.v(x))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """x (B, T, d) queries; k, v (B, H, S, d/H); allowed (B or 1, 1, T, S) bool or None -> (B, T, d)."""
        q = self._split(self.q(x))
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, T, d/H)
        return self.out(o.transpose(1, 2).reshape(x.shape))


class DecoderBlock(nn.Module):
    """Pre-LN causal self-attention, cross-attention to the encoder, then a (sparse) feed-forward block."""

    def __init__(self, dim: int, num_heads: int, dropout: float, ffn: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        memory: tuple[Tensor, Tensor, Tensor],
        real: Tensor,
        cache: list | None = None,
        keys: Tensor | None = None,
    ) -> tuple[Tensor, RoutingStats]:
        """One block.

        Args:
            y: (B, T, d) the decoder stream; with ``cache``, only the T newest positions.
            memory: (cross keys, cross values (B, H, L, d/H), allowed (B, 1, 1, L) real history positions).
            real: (B, T) tokens to route (real targets).
            cache: ``[self keys, self values]`` of the earlier positions ((B, H, t, d/H) or None),
                extended in place.
            keys: (B, T) int64 routing keys of the hash gate (the input token ids); None otherwise.
        """
        h = self.norm1(y)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[0], cache[1] = k, v
        t, s = y.shape[1], k.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool, device=y.device).tril(s - t)  # (T, S) True = attended
        y = y + self.drop(self.self_attn(h, k, v, causal))
        y = y + self.drop(self.cross_attn(self.norm2(y), *memory))
        out, stats = self.ffn(self.norm3(y), real, keys)
        return y + self.drop(out), stats


class OneRec(nn.Module):
    """Encoder over the history, (MoE) decoder over the next ``list_len`` items' semantic-ID tokens.

    Args:
        codes: (I, D) int64 semantic-ID tokens of every item (level codes, then the suffix).
        vocab_sizes: (D,) codebook size of each token position.
        max_len: history cap L.
        list_len: N, the items generated per list (and trained on per example).
        embedding_dim: d.
        encoder_blocks: bidirectional Transformer blocks over the history.
        decoder_blocks: decoder blocks.
        num_heads: attention heads.
        dropout: dropout on embeddings, attention and feed-forward outputs.
        ffn: ``"moe"`` (sparse mixture of experts) or ``"dense"`` (the control: one feed-forward
            block of hidden width ``top_k * expert_hidden``, equal active parameters).
        num_experts: experts per decoder feed-forward block.
        top_k: experts per token.
        expert_hidden: hidden width of each expert.
        capacity_factor: expert capacity, as a multiple of the balanced load; <= 0: unlimited.
        gate: the experts' gate (:mod:`recsys.models.gates`): ``"topk"`` (softmax top-k router),
            ``"hash"`` (Roller et al. 2021: a fixed random map from the position's input token id to
            one expert; needs ``top_k=1``; each block has its own map) or ``"comet"`` (COMET's tree
            gate, Ibrahim et al. KDD 2023: ``top_k`` soft binary trees). Ignored by ``ffn="dense"``.
    """

    def __init__(
        self,
        codes: Tensor,
        vocab_sizes: Sequence[int],
        max_len: int,
        list_len: int,
        embedding_dim: int = 64,
        encoder_blocks: int = 2,
        decoder_blocks: int = 2,
        num_heads: int = 2,
        dropout: float = 0.1,
        ffn: str = "moe",
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int = 128,
        capacity_factor: float = 1.25,
        gate: str = "topk",
    ):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate (model.net.gate) must be one of {GATES}, got {gate!r}")
        if ffn == "moe" and gate == "hash" and top_k != 1:
            raise ValueError(f"gate='hash' routes each token to one expert: set top_k=1, got top_k={top_k}")
        depth = len(vocab_sizes)
        if codes.dim() != 2 or codes.shape[1] != depth:
            raise ValueError(f"codes must be (num_items, {depth}), got {tuple(codes.shape)}")
        if ffn not in ("moe", "dense"):
            raise ValueError(f"ffn must be 'moe' or 'dense', got {ffn!r}")
        if list_len < 1 or max_len < 1:
            raise ValueError(f"list_len and max_len must be >= 1, got {list_len} and {max_len}")
        sizes = torch.tensor(list(vocab_sizes), dtype=torch.int64)
        if (codes < 0).any() or (codes >= sizes).any():
            raise ValueError("codes hold a token outside its position's vocabulary")
        self.depth, self.list_len, self.max_len = depth, list_len, max_len
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])  # (D,)
        total = int(sizes.sum())
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("tokens", codes + offsets, persistent=False)  # (I, D) global token ids
        level_mask = torch.zeros(depth, total, dtype=torch.bool)
        for p in range(depth):
            level_mask[p, offsets[p] : offsets[p] + sizes[p]] = True
        self.register_buffer("level_mask", level_mask, persistent=False)  # (D, V)
        self.bos = total
        d = embedding_dim
        self.code_embedding = nn.Embedding(total + 1, d)  # + BOS
        self.history_position = nn.Embedding(max_len, d)
        self.list_position = nn.Embedding(list_len * depth, d)
        layer = nn.TransformerEncoderLayer(
            d, num_heads, 4 * d, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, encoder_blocks, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )

        def feed_forward(block: int) -> nn.Module:
            if ffn == "dense":
                return DenseFFN(d, dense_hidden_for(d, expert_hidden, top_k), dropout)
            routing = dict(gate=gate, num_keys=total + 1, seed=block)  # hash keys: every token id, BOS
            return SparseMoE(d, expert_hidden, num_experts, top_k, capacity_factor, dropout, **routing)

        self.decoder = nn.ModuleList(
            DecoderBlock(d, num_heads, dropout, feed_forward(i)) for i in range(decoder_blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, total)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.code_embedding.weight, std=0.02)

    @property
    def num_items(self) -> int:
        return self.tokens.shape[0]

    def trie(self, allowed_items: Tensor | None = None) -> CodeTrie:
        """The prefix trie of the items' codes (``allowed_items``: (I,) bool, the generable ones)."""
        return CodeTrie(self.tokens - self.offsets, allowed_items, self.vocab_sizes)

    # ------------------------------------------------------------------ encoder / decoder

    def encode(self, histories: Tensor) -> tuple[Tensor, Tensor]:
        """histories (B, L') left-padded item ids, L' <= max_len -> memory (B, L', d), padding (B, L')."""
        pad = histories == PAD
        x = self.code_embedding(self.tokens[histories.clamp(min=0)]).sum(2)  # (B, L', d)
        x = x + self.history_position.weight[self.max_len - histories.shape[1] :]
        x = self.drop(x).masked_fill(pad.unsqueeze(-1), 0.0)
        return self.encoder(x, src_key_padding_mask=pad), pad

    def memory(self, encoded: Tensor, pad: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Each decoder block's cross-attention keys, values and mask over the encoded history."""
        allowed = (~pad)[:, None, None, :]  # (B, 1, 1, L)
        return [(*block.cross_attn.keys_values(encoded), allowed) for block in self.decoder]

    def decode(
        self, memory: list, inputs: Tensor, real: Tensor, start: int = 0, caches: list | None = None
    ) -> tuple[Tensor, list]:
        """inputs (B, T) token ids at positions ``start``.. -> (B, T, V) logits, masked to each level.

        With ``caches`` (one ``[keys, values]`` per block), earlier positions come from the cache and
        are extended with these.
        """
        t = inputs.shape[1]
        y = self.drop(self.code_embedding(inputs) + self.list_position.weight[start : start + t])
        stats = []
        for i, block in enumerate(self.decoder):
            y, st = block(y, memory[i], real, None if caches is None else caches[i], inputs)
            stats.append(st)
        logits = self.head(self.norm(y))  # (B, T, V)
        levels = torch.arange(start, start + t, device=inputs.device) % self.depth
        return logits.masked_fill(~self.level_mask[levels], float("-inf")), stats

    def _teacher_forced(self, histories: Tensor, lists: Tensor) -> tuple[Tensor, Tensor, list]:
        """(log-probs of the target tokens (B, N*D), target real mask, routing stats)."""
        b = lists.shape[0]
        real_items = lists != PAD  # (B, N)
        targets = self.tokens[lists.clamp(min=0)].reshape(b, -1)  # (B, N*D)
        real = real_items.repeat_interleave(self.depth, dim=1)  # (B, N*D)
        bos = torch.full((b, 1), self.bos, dtype=torch.int64, device=lists.device)
        inputs = torch.cat([bos, targets[:, :-1]], 1)
        logits, stats = self.decode(self.memory(*self.encode(histories)), inputs, real)
        logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, N*D)
        return logp.masked_fill(~real, 0.0), real, stats

    def losses(self, histories: Tensor, futures: Tensor) -> dict[str, Tensor | list[RoutingStats]]:
        """Next-token loss of the future lists plus the routing losses.

        Args:
            histories: (B, L) left-padded item ids.
            futures: (B, N') the next items, right-padded with ``PAD`` (N' <= list_len; at least one real).

        Returns:
            ``{"nll": (), "aux": (), "z": (), "routing": [RoutingStats per decoder block]}``.
        """
        logp, real, stats = self._teacher_forced(histories, futures)
        nll = -logp.sum() / real.sum().clamp(min=1)
        aux = torch.stack([s.aux_loss for s in stats]).mean()
        z = torch.stack([s.z_loss for s in stats]).mean()
        return {"nll": nll, "aux": aux, "z": z, "routing": stats}

    def list_logprob(self, histories: Tensor, lists: Tensor) -> Tensor:
        """(B,) log p(list | history): the sum of its real tokens' log-probabilities (for DPO)."""
        return self._teacher_forced(histories, lists)[0].sum(1)

    # ------------------------------------------------------------------ generation

    def _start(self, histories: Tensor, copies: int) -> tuple[list, list]:
        """Cross-attention memory of each history, repeated ``copies`` times; empty self-attention caches."""
        memory = [
            tuple(m.repeat_interleave(copies, 0) for m in block)
            for block in self.memory(*self.encode(histories))
        ]
        return memory, [[None, None] for _ in self.decoder]

    def _step_logprobs(
        self, memory: list, caches: list, last: Tensor, step: int, temperature: float = 1.0
    ) -> Tensor:
        """(n, V_level) log-probabilities of token ``step`` given the previous token ``last`` (n,), BOS first.

        Reads and extends ``caches``; the level of token ``step`` is ``step mod D``.
        """
        inputs = last.unsqueeze(1)  # (n, 1)
        real = torch.ones_like(inputs, dtype=torch.bool)
        logits, _ = self.decode(memory, inputs, real, start=step, caches=caches)
        level = step % self.depth
        lo = int(self.offsets[level])
        return (logits[:, 0, lo : lo + self.vocab_sizes[level]] / temperature).log_softmax(-1)

    @staticmethod
    def _reorder(caches: list, origin: Tensor) -> None:
        for cache in caches:
            cache[0], cache[1] = cache[0][origin], cache[1][origin]

    def _check_generation(self, trie: CodeTrie, list_len: int, width: int) -> None:
        if not 1 <= list_len <= self.list_len:
            raise ValueError(f"list_len must be in [1, {self.list_len}] (the trained length), got {list_len}")
        valid = trie.num_valid_items
        if list_len > valid or not 1 <= width <= valid:
            raise ValueError(
                f"a list of {list_len} distinct items with beam width {width} needs at least that many valid "
                f"continuations, but the trie has {valid} generable items; lower the width or the list length"
            )

    @torch.no_grad()
    def beam_search(
        self, histories: Tensor, trie: CodeTrie, list_len: int, width: int
    ) -> tuple[Tensor, Tensor]:
        """Trie-constrained beam search for lists of ``list_len`` distinct real items.

        Args:
            histories: (B, L) left-padded item ids.
            trie: the generable items' codes (:meth:`trie`).
            list_len: items per list (<= the trained ``list_len``).
            width: beams kept per history.

        Returns:
            (lists (B, W, N) item ids, best first; their log-probabilities (B, W)).

        Raises:
            ValueError: ``width`` larger than the number of valid continuations.
        """
        self._check_generation(trie, list_len, width)
        b, dev = histories.shape[0], histories.device
        memory, caches = self._start(histories, width)  # rows of a history's beams share its memory
        score = torch.full((b, width), float("-inf"), device=dev)
        score[:, 0] = 0.0  # one live beam at the start
        last = torch.full((b * width,), self.bos, dtype=torch.int64, device=dev)
        nodes = trie.root(b * width, dev)
        lists = torch.full((b * width, list_len), PAD, dtype=torch.int64, device=dev)
        excluded = torch.zeros(b * width, self.num_items, dtype=torch.bool, device=dev)
        for step in range(list_len * self.depth):
            level = step % self.depth
            logp = self._step_logprobs(memory, caches, last, step)  # (B*W, V)
            logp = logp.masked_fill(~trie.allowed(level, nodes, excluded), float("-inf"))
            v = logp.shape[1]
            cand = (score.unsqueeze(-1) + logp.view(b, width, v)).view(b, width * v)  # (B, W*V)
            score, flat = cand.topk(width, dim=1)  # (B, W)
            # fewer valid candidates than beams (e.g. few first-level codes): the extra beams copy the
            # best one and keep a score of -inf, so they are chosen only when nothing finite is left
            flat = torch.where(torch.isfinite(score), flat, flat[:, :1])
            origin = (flat // v + torch.arange(b, device=dev).unsqueeze(1) * width).view(-1)  # (B*W,)
            token = (flat % v).view(-1)
            self._reorder(caches, origin)
            nodes, lists, excluded = nodes[origin], lists[origin], excluded[origin]
            nodes = trie.step(level, nodes, token)
            last = token + self.offsets[level]
            if level == self.depth - 1:
                items = trie.items(nodes)  # (B*W,)
                lists[:, step // self.depth] = items
                excluded[torch.arange(b * width, device=dev), items] = True
                nodes = trie.root(b * width, dev)
        if not torch.isfinite(score).all():
            raise RuntimeError("beam search ended with a beam that is not a complete list of real items")
        return lists.view(b, width, list_len), score

    @torch.no_grad()
    def sample(
        self,
        histories: Tensor,
        trie: CodeTrie,
        list_len: int,
        num_samples: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ancestral sampling of ``num_samples`` lists per history under the trie (no duplicates in a list).

        Returns:
            (B, S, N) item ids.
        """
        self._check_generation(trie, list_len, 1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        b, dev = histories.shape[0], histories.device
        n = b * num_samples
        memory, caches = self._start(histories, num_samples)
        last = torch.full((n,), self.bos, dtype=torch.int64, device=dev)
        nodes = trie.root(n, dev)
        lists = torch.full((n, list_len), PAD, dtype=torch.int64, device=dev)
        excluded = torch.zeros(n, self.num_items, dtype=torch.bool, device=dev)
        for step in range(list_len * self.depth):
            level = step % self.depth
            logp = self._step_logprobs(memory, caches, last, step, temperature)
            logp = logp.masked_fill(~trie.allowed(level, nodes, excluded), float("-inf"))
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (n,)
            nodes = trie.step(level, nodes, token)
            last = token + self.offsets[level]
            if level == self.depth - 1:
                items = trie.items(nodes)
                lists[:, step // self.depth] = items
                excluded[torch.arange(n, device=dev), items] = True
                nodes = trie.root(n, dev)
        return lists.view(b, num_samples, list_len)


def ranked_scores(lists: Tensor, num_items: int) -> Tensor:
    """(B, M) item ids in rank order (``PAD`` allowed) -> (B, I): M - rank for them, ``NEG`` elsewhere."""
    b, m = lists.shape
    scores = torch.full((b, num_items + 1), NEG, device=lists.device)
    rank_score = torch.arange(m, 0, -1, dtype=scores.dtype, device=lists.device).expand(b, m)
    scores.scatter_(1, torch.where(lists == PAD, num_items, lists), rank_score)
    return scores[:, :num_items]


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    r"""Direct preference optimisation (Rafailov et al., NeurIPS 2023), mean over pairs:

    .. math::
        -\log\sigma\big(\beta[(\log\pi(y_w) - \log\pi_{ref}(y_w)) - (\log\pi(y_l) - \log\pi_{ref}(y_l))]\big)

    All arguments are (P,) list log-probabilities.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()
