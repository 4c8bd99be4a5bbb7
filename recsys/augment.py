"""LLMRec's side information for the dataset of a trained base recommender, written once.

python -m recsys.augment ckpt_path=outputs/lightgcn_ml100k/<run>/checkpoints/epoch_186.ckpt
python -m recsys.augment ckpt_path=... llm=openai llm.provider.backend.base_url=http://127.0.0.1:8000/v1

The checkpoint's stored training config rebuilds the data and the model; each user's pair
candidates are the model's top ``candidates`` items outside the user's training items (Wei et
al., LLMRec, sec. 3.1); the provider (``llm=offline|openai|hf``) answers; the texts are
embedded and the :class:`~recsys.llm.augment.Augmentation` is saved to ``out``. Runs whose
filters renumbered users or items (e.g. ML-1M with ratings >= 3) are mapped back to the
dataset's titles and demographics through the datamodule's ``user_ids`` / ``item_ids``; the
augmentation is in the run's numbering.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from recsys import checkpoint
from recsys.data.registry import load_interactions
from recsys.llm.augment import augment, minilm_encoder
from recsys.llm.tasks import Catalogue
from recsys.train import USER_ERRORS, ConfigError, entry_point
from retrieval.eval.report import atomic_write_text
from retrieval.eval.topk import full_sort_topk

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    """Write the augmentation of ``cfg.ckpt_path``'s dataset to ``cfg.out``; return its path."""
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required: a trained base recommender's checkpoint")
    if cfg.candidates < 2:
        raise ConfigError(f"candidates must be >= 2 (a liked and a disliked item), got {cfg.candidates}")
    train_cfg = OmegaConf.create(checkpoint.load_info(cfg.ckpt_path)["config"])
    with open_dict(train_cfg):
        if cfg.paths.data_dir is not None:
            train_cfg.data.root = cfg.paths.data_dir
    datamodule = instantiate(train_cfg.data)
    datamodule.setup("fit")
    data = load_interactions(train_cfg.data.dataset, root=train_cfg.data.get("root"))
    catalogue = Catalogue.of(data).select(datamodule.user_ids.tolist(), datamodule.item_ids.tolist())
    module = instantiate(train_cfg.model, evaluator=instantiate(train_cfg.evaluator))
    module.load_state_dict(torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    net = module.net.eval()
    if hasattr(net, "set_graph"):
        net.set_graph(*datamodule.train_pairs())
    n_users = datamodule.num_users if cfg.max_users is None else min(cfg.max_users, datamodule.num_users)
    users = torch.arange(n_users)
    train = datamodule.exclude("val")  # the training items
    with torch.no_grad():
        _, top = full_sort_topk(net.score_all, users, cfg.candidates, exclude=train)  # (U, K)
    candidates = [[i for i in row if i >= 0] for row in top.tolist()]
    histories = [train.indices[train.indptr[u] : train.indptr[u + 1]].tolist() for u in range(n_users)]
    provider = instantiate(cfg.llm.provider)
    encode = provider_encoder(provider)
    result = augment(
        provider,
        catalogue,
        histories,
        candidates,
        encode,
        datamodule.train_fingerprint(),
        datamodule.num_users,
    )
    out = Path(cfg.out)
    result.save(out)
    summary = {
        "provider": result.provider,
        "users": n_users,
        "pairs": int(result.pairs.shape[0]),
        "fallbacks": result.fallbacks,
        "base checkpoint": str(cfg.ckpt_path),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2))
    log.info("augmentation written to %s: %s", out, summary)
    return out


def provider_encoder(provider):
    """The text encoder: the offline provider's own, else all-MiniLM-L6-v2."""
    return getattr(provider, "encode", None) or minilm_encoder()


main = entry_point("augment", run, USER_ERRORS)


if __name__ == "__main__":
    main()
