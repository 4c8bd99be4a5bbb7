r"""Training of the OneRec-style generative recommender: next-token pre-training, then rounds of
iterative preference alignment (DPO against a reward model), evaluated by the shared harness.

Phases, by epoch (``trainer.max_epochs = pretrain_epochs + rounds * round_epochs``):

1. **Pre-training** (epochs ``< pretrain_epochs``): each training row is cut at a random point
   (:func:`~recsys.data.sequences.cut_rows`) into a history and its next ``list_len`` items, and
   the decoder learns to generate them (next-token loss plus ``aux_weight`` times the MoE
   load-balancing loss and ``z_weight`` times the router z-loss).
2. **Alignment round** ``r`` (``round_epochs`` epochs each): at the round's first epoch the
   current model is frozen as the reference :math:`\pi_{ref}`. Each batch, ``num_samples`` lists
   per history are sampled from the policy (temperature ``temperature``, trie-constrained), the
   reward model scores them, and the best and the worst form a (chosen, rejected) pair trained
   with DPO (:func:`~recsys.models.onerec.dpo_loss`, strength ``beta``). The reference is not
   saved in checkpoints: a run resumed in the middle of a round freezes its resumed model as the
   round's reference.

The reward model (:class:`~recsys.models.reward.ListRewardModel`) is trained once, at the start of
fitting, on the training rows' engagement only (``train_engaged`` of the datamodule: cut points,
the next items with their engagement flags, and uniform negatives); its held-out AUC (on a share
of the training rows it did not fit) is logged as ``reward/auc``.

Evaluation (every stage, with the shared top-K evaluator): the default and ``cold`` protocols
rank the items of a one-item beam search (width ``eval_beam``, at least the largest K) by their
beam log-probability: the model's first generated item and its runners-up. The ``session``
protocol (``data.horizon > 1``) scores the best beam's list of ``list_len`` items (beam width
``session_beam``) against the row's next items, so its evaluator should use ``ks: [list_len]``;
the mean reward-model score of that list is logged as ``<stage>/reward``. Expert utilisation is
logged per epoch: ``moe/min_share`` and ``moe/max_share`` (of the processed assignments, over
experts and blocks, 1/E each when balanced), ``moe/starved`` (experts under a tenth of their
share) and ``moe/dropped`` (share of assignments dropped by capacity).

At the validation that ends pre-training and each round (so ``check_val_every_n_epoch`` must fall
on those epochs), the validation metrics, the mean reward and, for pre-training, the routing
summary are kept in :attr:`GenerativeRecommender.phases` (saved in checkpoints) and written to
``phases.json`` in the run folder: the effect of each DPO round, apart from model selection.

Only items seen in a training row can be generated (the trie holds those), as SASRec learns
nothing about the others.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from recsys.code_trie import CodeTrie
from recsys.data.sequences import PAD, cut_rows
from recsys.lit.evaluation import EvaluatedRecommender
from recsys.models.moe import expert_utilisation, starved_experts
from recsys.models.onerec import OneRec, dpo_loss, ranked_scores
from recsys.models.reward import ListRewardModel, auc
from recsys.semantic_ids import SemanticIds
from retrieval.eval.topk_evaluator import TopKEvaluator

log = logging.getLogger(__name__)


class GenerativeRecommender(EvaluatedRecommender):
    """OneRec pre-training and DPO rounds around :class:`~recsys.models.onerec.OneRec`.

    Args:
        net: partial of :class:`~recsys.models.onerec.OneRec`, called at setup with the codes.
        semantic_ids: ``(datamodule) -> SemanticIds`` (:func:`recsys.semantic_ids.for_datamodule` partial).
        optimizer: partial of a torch optimizer.
        evaluator: the shared top-K evaluator (default protocol).
        extra_evaluators: protocol name -> evaluator (``cold``, ``session``).
        list_len: N, items per generated list (the datamodule's ``horizon``).
        cuts_per_row: random cut points per training row and step (each a training example).
        aux_weight: weight of the MoE load-balancing loss.
        z_weight: weight of the router z-loss.
        pretrain_epochs: next-token epochs before alignment.
        rounds: DPO rounds (0: no alignment).
        round_epochs: epochs per round.
        beta: DPO strength.
        num_samples: lists sampled per history in a DPO step (>= 2).
        temperature: sampling temperature.
        dpo_lr: learning rate during alignment.
        eval_beam: beam width of next-item ranking (>= the largest K reported).
        session_beam: beam width of list generation.
        reward_steps: reward-model steps (batches of 256 training rows, each cut at a random point).
        reward_holdout: share of training rows kept out of the reward model's fit (for its AUC).
        seed: seed of cut points and samples.
    """

    batch_kind = "sequence"

    def __init__(
        self,
        net: Callable[..., OneRec],
        semantic_ids: Callable[..., SemanticIds],
        optimizer: Callable[..., torch.optim.Optimizer],
        evaluator: TopKEvaluator,
        extra_evaluators: Mapping[str, TopKEvaluator] | None = None,
        list_len: int = 5,
        cuts_per_row: int = 4,
        aux_weight: float = 0.01,
        z_weight: float = 0.001,
        pretrain_epochs: int = 30,
        rounds: int = 2,
        round_epochs: int = 3,
        beta: float = 0.1,
        num_samples: int = 4,
        temperature: float = 1.0,
        dpo_lr: float = 1e-4,
        eval_beam: int = 20,
        session_beam: int = 5,
        reward_steps: int = 500,
        reward_holdout: float = 0.1,
        seed: int = 0,
    ):
        checks = {
            "list_len": list_len >= 1,
            "cuts_per_row": cuts_per_row >= 1,
            "pretrain_epochs": pretrain_epochs >= 0,
            "rounds": rounds >= 0,
            "round_epochs": round_epochs >= 1,
            "beta": beta > 0,
            "num_samples": num_samples >= 2,
            "temperature": temperature > 0,
            "eval_beam": eval_beam >= 1,
            "session_beam": session_beam >= 1,
            "reward_holdout": 0 < reward_holdout < 1,
            "reward_steps": reward_steps >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"model.{bad[0]} is out of range (see GenerativeRecommender's docstring)")
        super().__init__(evaluator, extra_evaluators)
        self.save_hyperparameters(
            logger=False, ignore=["net", "semantic_ids", "evaluator", "extra_evaluators", "optimizer"]
        )
        self.net_factory, self.ids_factory, self.optimizer_factory = net, semantic_ids, optimizer
        self.net: OneRec | None = None
        self.reward_model: ListRewardModel | None = None
        self._reference: list[OneRec] = []  # the frozen DPO reference, kept out of the state dict
        self._histories: dict[str, Tensor] = {}
        self._moe: dict[str, Tensor] = {}
        self._reward_sums: list[Tensor] = []
        self._routing: dict[str, float] = {}  # the last training epoch's routing summary
        self._trie_cache: tuple[torch.device, CodeTrie] | None = None  # generable items, on the device
        self._reward_auc: float | None = None  # held-out AUC of the reward model, once fitted
        self.phases: dict[str, dict[str, float]] = {}  # phase -> validation at its end (phases.json)

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        self.check_batches(stage)
        if self.net is not None:
            return
        dm = self.trainer.datamodule
        ids = self.ids_factory(dm)
        seen = torch.zeros(dm.num_items + 1, dtype=torch.bool)
        seen[dm.train_rows.clamp(min=-1)] = True  # PAD (-1) lands in the extra slot
        self.register_buffer("generable", seen[:-1].clone(), persistent=False)  # (I,)
        self.semantic = ids
        self.register_buffer("codes", ids.codes.clone())  # (I, D), checked when a checkpoint loads
        self.net = self.net_factory(
            codes=ids.codes, vocab_sizes=ids.vocab_sizes, max_len=dm.max_len, list_len=self.hparams.list_len
        )
        self.reward_model = ListRewardModel(
            ids.codes[:, : ids.levels], ids.codebook_size, self.net.code_embedding.embedding_dim
        )  # items by their k-means codes (no suffix)
        self.register_buffer("reward_ready", torch.zeros((), dtype=torch.bool))
        need = self.hparams.pretrain_epochs + self.hparams.rounds * self.hparams.round_epochs
        max_epochs = self.trainer.max_epochs
        if stage == "fit" and max_epochs is not None and 0 <= max_epochs < need:  # -1: unbounded
            log.warning(
                "trainer.max_epochs=%d ends before alignment does (pretrain_epochs + rounds * round_epochs = "
                "%d): the last rounds will not run",
                self.trainer.max_epochs,
                need,
            )
        if "session" in self.evaluators and getattr(dm, "horizon", 1) != self.hparams.list_len:
            raise ValueError(
                f"model.list_len={self.hparams.list_len} but data.horizon={dm.horizon}: the session protocol "
                "compares a generated list with that many next items; set them equal"
            )

    def _generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Seeded by (seed, step): cut points on the CPU, samples on the module's device."""
        return torch.Generator(device=device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)

    def _trie(self) -> CodeTrie:
        if self._trie_cache is None or self._trie_cache[0] != self.device:
            self._trie_cache = (self.device, self.net.trie(self.generable))
        return self._trie_cache[1]

    # ------------------------------------------------------------------ reward model

    def on_fit_start(self) -> None:
        if not bool(self.reward_ready):
            self._fit_reward_model()
            self.reward_ready.fill_(True)

    def _reward_examples(
        self, rows: Tensor, engaged: Tensor, g: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(histories, items, labels): each row cut once; the next items (engagement), as many negatives."""
        n = self.hparams.list_len
        hist, fut, cols = cut_rows(rows, self.net.max_len, n, g)
        labels = torch.where(cols >= 0, engaged.gather(1, cols.clamp(min=0)), False)
        negatives = torch.randint(0, self.net.num_items, fut.shape, generator=g).to(rows.device)
        negatives = torch.where(fut == PAD, PAD, negatives)
        return hist, torch.cat([fut, negatives], 1), torch.cat([labels, torch.zeros_like(labels)], 1)

    def _fit_reward_model(self) -> None:
        dm = self.trainer.datamodule
        rows, engaged = dm.train_rows.to(self.device), dm.train_engaged.to(self.device)
        g = torch.Generator().manual_seed(self.hparams.seed + 17)
        order = torch.randperm(rows.shape[0], generator=g).to(self.device)
        n_hold = max(1, int(self.hparams.reward_holdout * rows.shape[0]))
        held, fit = order[:n_hold], order[n_hold:]
        rm = self.reward_model
        opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
        rm.train()
        for _ in range(self.hparams.reward_steps):
            idx = fit[torch.randint(0, fit.numel(), (256,), generator=g).to(self.device)]
            h, items, labels = self._reward_examples(rows[idx], engaged[idx], g)
            loss = rm.loss(h, items, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rm.eval()
        with torch.no_grad():
            h, items, labels = self._reward_examples(rows[held], engaged[held], g)
            real = items != PAD
            scores = rm.item_logits(h, items)[real].cpu()
            value = auc(scores, labels[real].cpu())
        share = float(engaged[fit].sum() / (rows[fit] != PAD).sum())
        log.info(
            "reward model: held-out AUC %.4f on %d rows (engaged share of events %.3f)", value, n_hold, share
        )
        self._reward_auc = value
        freeze(rm)

    # ------------------------------------------------------------------ training

    def _phase(self) -> tuple[str, int]:
        e = self.current_epoch - self.hparams.pretrain_epochs
        return ("pretrain", -1) if e < 0 else ("align", e // self.hparams.round_epochs)

    def on_train_epoch_start(self) -> None:
        self._moe = {}
        if self._reward_auc is not None:
            self.log("reward/auc", self._reward_auc)
        kind, r = self._phase()
        starts_round = (
            kind == "align"
            and (self.current_epoch - self.hparams.pretrain_epochs) % self.hparams.round_epochs == 0
        )
        if starts_round or (kind == "align" and not self._reference):
            self._reference = [freeze(copy.deepcopy(self.net).eval())]
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.hparams.dpo_lr
            log.info("alignment round %d: reference frozen at epoch %d", r, self.current_epoch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        rows = batch["items"]  # (B, L + 1)
        if self._phase()[0] == "align":
            hist, _, _ = cut_rows(rows, self.net.max_len, self.hparams.list_len, self._generator())
            return self._dpo_step(hist, batch_idx)
        rows = rows.repeat(self.hparams.cuts_per_row, 1)  # (c * B, L + 1), each copy cut apart
        hist, fut, _ = cut_rows(rows, self.net.max_len, self.hparams.list_len, self._generator())
        out = self.net.losses(hist, fut)
        self._count_routing(out["routing"])
        loss = out["nll"] + self.hparams.aux_weight * out["aux"] + self.hparams.z_weight * out["z"]
        self._accumulate_loss(out["nll"].detach(), rows.shape[0], batch_idx)
        return loss

    def _dpo_step(self, hist: Tensor, batch_idx: int) -> Tensor:
        s, n = self.hparams.num_samples, self.hparams.list_len
        self.net.eval()
        samples = self.net.sample(
            hist, self._trie(), n, s, self.hparams.temperature, self._generator(hist.device)
        )
        self.net.train()  # (B, S, N)
        b = hist.shape[0]
        rewards = self.reward_model.reward(hist.repeat_interleave(s, 0), samples.view(b * s, n)).view(b, s)
        best, worst = rewards.argmax(1), rewards.argmin(1)
        gap = rewards.max(1).values - rewards.min(1).values  # (B,)
        keep = gap > 0
        rows = torch.arange(b, device=hist.device)[keep]
        chosen, rejected, h = samples[rows, best[keep]], samples[rows, worst[keep]], hist[keep]
        policy_c, policy_r = self.net.list_logprob(h, chosen), self.net.list_logprob(h, rejected)
        with torch.no_grad():
            ref = self._reference[0]
            ref_c, ref_r = ref.list_logprob(h, chosen), ref.list_logprob(h, rejected)
        loss = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.hparams.beta)
        self.log("train/sample_reward", rewards.mean(), on_step=False, on_epoch=True)
        self.log(
            "train/reward_gap",
            gap.mean(),
            on_step=False,
            on_epoch=True,
        )
        self._accumulate_loss(loss.detach(), b, batch_idx)
        return loss

    def _count_routing(self, stats: list) -> None:
        for i, st in enumerate(stats):
            key = f"block{i}"
            counts = st.tokens_per_expert.detach().float()
            extra = torch.stack([st.dropped.detach().float(), st.assignments.detach().float()])
            if key in self._moe:
                self._moe[key] = self._moe[key] + counts
                self._moe[key + "/drop"] = self._moe[key + "/drop"] + extra
            else:
                self._moe[key], self._moe[key + "/drop"] = counts, extra

    def on_train_epoch_end(self) -> None:
        blocks = [k for k in self._moe if not k.endswith("/drop")]
        if not blocks or self._moe[blocks[0]].numel() < 2:
            return
        shares = torch.stack([expert_utilisation(self._moe[k]) for k in blocks])  # (blocks, E)
        starved = sum(starved_experts(self._moe[k]) for k in blocks)
        drop = torch.stack([self._moe[k + "/drop"] for k in blocks]).sum(0)
        self._routing = {
            "moe/min_share": float(shares.min()),
            "moe/max_share": float(shares.max()),
            "moe/starved": float(starved),
            "moe/dropped": float(drop[0] / drop[1].clamp(min=1)),
        }
        self.log_dict(self._routing)

    # ------------------------------------------------------------------ evaluation

    def _stage_histories(self, stage: str) -> Tensor:
        if stage not in self._histories:
            self._histories[stage] = self.trainer.datamodule.histories(stage).to(self.device)
        return self._histories[stage]

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        histories = self._stage_histories(stage)
        rows = batch["users"].to(self.device)  # (b,)
        hist = histories[rows]
        position = torch.full((histories.shape[0],), -1, dtype=torch.int64, device=self.device)
        position[rows] = torch.arange(rows.numel(), device=self.device)
        trie = self._trie()
        lists, _ = self.net.beam_search(hist, trie, 1, self.hparams.eval_beam)  # (b, W, 1)
        next_scores = ranked_scores(lists[:, :, 0], self.net.num_items)  # (b, I)
        session_scores = None
        for protocol, evaluator in self.evaluators.items():
            targets, exclude = self._sets_on_device(stage, protocol)
            if not bool((targets.sizes()[rows.to(targets.indptr.device)] > 0).any()):
                continue
            if protocol == "session":
                if session_scores is None:
                    best, _ = self.net.beam_search(
                        hist, trie, self.hparams.list_len, self.hparams.session_beam
                    )
                    session_scores = ranked_scores(best[:, 0], self.net.num_items)
                    self._reward_sums.append(self.reward_model.reward(hist, best[:, 0]).detach().cpu())
                table = session_scores
            else:
                table = next_scores

            def score(users: Tensor, table: Tensor = table) -> Tensor:
                return table[position[users.to(self.device)]]

            result = evaluator.per_user(score, targets, exclude, device=self.device, users=rows)
            prefix = f"{protocol}/" if protocol else ""
            for name, values in result.metrics.items():
                self._per_user[prefix + name].append(values.detach().cpu())

    def _phase_end(self) -> str | None:
        """The phase the current epoch ends ("pre-training", "round 1", ...), or None."""
        e, pre, per = self.current_epoch, self.hparams.pretrain_epochs, self.hparams.round_epochs
        if e == pre - 1:
            return "pre-training"
        done, rest = divmod(e - pre + 1, per)
        return f"round {done}" if e >= pre and rest == 0 and done <= self.hparams.rounds else None

    def _eval_epoch_end(self, stage: str) -> None:
        self._histories.pop(stage, None)
        reward = None
        if self._reward_sums:
            reward = torch.cat(self._reward_sums).double().mean().item()
            self.log(f"{stage}/reward", reward)
            self._reward_sums = []
        label = self._phase_end() if stage == "val" and self.trainer.state.fn == "fit" else None
        if label is not None and not self.trainer.sanity_checking:
            means = {f"val/{k}": torch.cat(v).double().mean().item() for k, v in self._per_user.items()}
            routing = self._routing if label == "pre-training" else {}  # counted in pre-training only
            self.phases[label] = means | ({"val/reward": reward} if reward is not None else {}) | routing
            self._write_phases()
        super()._eval_epoch_end(stage)

    def _write_phases(self) -> None:
        """phases.json in the run folder: validation at the end of pre-training and of each round."""
        path = Path(self.trainer.default_root_dir) / "phases.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.phases, indent=1))
        os.replace(tmp, path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["onerec_phases"] = self.phases

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(params=self.net.parameters())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose semantic IDs differ from the ones built from this data."""
        self.phases = dict(checkpoint.get("onerec_phases", {}))
        saved = checkpoint.get("state_dict", {}).get("codes")
        if saved is not None and (
            saved.shape != self.codes.shape or not torch.equal(saved.cpu(), self.codes.cpu())
        ):
            raise ValueError(
                f"the checkpoint's semantic IDs {tuple(saved.shape)} differ from the ones built from the "
                f"data {tuple(self.codes.shape)} ({self.semantic.source}): another dataset, split seed or "
                "codebook (model.semantic_ids.*); use the same settings as the training run"
            )


def freeze(module: nn.Module) -> nn.Module:
    """Stop the gradients of every parameter; returns ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
