r"""Propensity estimators for learning from missing-not-at-random implicit feedback, in one place.

A click :math:`Y_{ui} = O_{ui} R_{ui}` needs both exposure (:math:`O`, probability
:math:`\theta_{ui}`, the *propensity*) and relevance (:math:`R`). Inverse-propensity estimators
(:mod:`recsys.models.relmf`) divide clicks by :math:`\theta`; every estimator here returns a
:class:`Propensity`, a lookup ``(users, items) -> theta``:

* :func:`popularity` -- :math:`\theta_i = (n_i / \max_j n_j)^{\eta}` with :math:`n_i` the item's
  clicks in training (Saito et al., WSDM 2020, sec. 5.1; :math:`\eta = 0.5` there);
* :func:`shipped` -- a (users x items) matrix shipped with the data (Coat's
  ``propensities.ascii``, learned by Schnabel et al., ICML 2016);
* :func:`uniform` -- :math:`\theta = 1`: inverse-propensity weighting becomes the naive loss.

**Clipping** (Saito et al., eq. 7): :math:`\theta \leftarrow \max(\theta, M)` with ``clip`` = M;
``clip = 0`` turns it off. Without clipping, a zero, negative or NaN propensity on a clicked pair
(where the estimators divide by it) is refused; NaN is refused even with clipping on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from recsys.data.tables import InteractionData


class PropensityError(ValueError):
    """Propensities that an inverse-propensity estimator cannot use."""


@dataclass(frozen=True)
class Propensity:
    """Exposure probabilities, per item or per (user, item) pair.

    Attributes:
        table: (num_items,) per-item or (num_users, num_items) per-pair float32 propensities,
            already clipped.
        name: how the report names the estimator.
        clip: the lower clip applied (0 = none).
    """

    table: Tensor
    name: str
    clip: float = 0.0

    def __call__(self, users: Tensor, items: Tensor) -> Tensor:
        """(B,) propensities of the pairs ``(users[b], items[b])``."""
        if self.table.dim() == 1:
            return self.table[items]
        return self.table[users, items]


def _clipped(table: Tensor, clip: float, name: str) -> Propensity:
    if clip < 0 or clip > 1:
        raise PropensityError(f"clip must lie in [0, 1] (0 = off), got {clip}")
    table = table.to(torch.float32)
    if clip > 0:
        table = table.clamp(min=clip)  # NaN stays NaN: refused by check_clicked
        name = f"{name}, clipped at {clip:g}"
    return Propensity(table, name, clip)


def popularity(
    users: Tensor,
    items: Tensor,
    num_users: int,
    num_items: int,
    data: InteractionData | None = None,
    eta: float = 0.5,
    clip: float = 0.0,
) -> Propensity:
    r"""Item popularity to the power ``eta``: :math:`\theta_i = (n_i / \max_j n_j)^{\eta}`.

    Args:
        users, items: (E,) int64 clicked training pairs.
        num_users, num_items: matrix size.
        data: unused (every estimator takes the dataset).
        eta: (float, default 0.5) the power; 0 gives the uniform estimator.
        clip: (float, default 0) lower clip of :math:`\theta` (0 = off).
    """
    if eta < 0:
        raise PropensityError(f"eta must be >= 0, got {eta}")
    counts = torch.bincount(items, minlength=num_items).to(torch.float64)  # (I,)
    theta = (counts / counts.max().clamp(min=1)) ** eta  # (I,) never-clicked items: 0 (1 when eta = 0)
    return _clipped(theta, clip, f"item popularity^{eta:g}")


def shipped(
    users: Tensor,
    items: Tensor,
    num_users: int,
    num_items: int,
    data: InteractionData,
    table: str = "propensities",
    clip: float = 0.0,
) -> Propensity:
    """The per-(user, item) propensities that came with the data (``data.extra[table]``).

    Raises:
        PropensityError: the dataset has no such table, or its shape is not the data's (both named).
    """
    if table not in data.extra:
        raise PropensityError(
            f"{data.name} ships no {table!r} table (it has: {sorted(data.extra) or 'none'})"
        )
    frame = data.extra[table]
    shape = (int(frame["user"].max()) + 1, int(frame["item"].max()) + 1)
    if shape != (num_users, num_items) or frame.height != num_users * num_items:
        raise PropensityError(
            f"{data.name} {table}: a {shape[0]} x {shape[1]} matrix ({frame.height} values), "
            f"but the data has {num_users} users x {num_items} items"
        )
    matrix = torch.full((num_users, num_items), float("nan"))
    u = torch.from_numpy(frame["user"].to_numpy().astype("int64"))
    i = torch.from_numpy(frame["item"].to_numpy().astype("int64"))
    matrix[u, i] = torch.from_numpy(frame["propensity"].to_numpy().astype("float32"))
    return _clipped(matrix, clip, f"{data.name} {table}")


def uniform(
    users: Tensor,
    items: Tensor,
    num_users: int,
    num_items: int,
    data: InteractionData | None = None,
    clip: float = 0.0,
) -> Propensity:
    """:math:`\theta = 1` everywhere: the naive (biased) estimator."""
    return _clipped(torch.ones(num_items), clip, "uniform (naive)")


def check_clicked(propensity: Propensity, users: Tensor, items: Tensor) -> None:
    """Refuse propensities the estimator would divide by on clicked pairs.

    Raises:
        PropensityError: NaN on a clicked pair; zero or negative ones unless clipping is on.
    """
    theta = propensity(users, items)  # (E,)
    bad = torch.isnan(theta) if propensity.clip > 0 else torch.isnan(theta) | (theta <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise PropensityError(
            f"{propensity.name}: {int(bad.sum())} clicked pairs have an unusable propensity, e.g. user "
            f"{int(users[i])}, item {int(items[i])}: {float(theta[i])}"
            + ("" if propensity.clip > 0 else "; propensities must be > 0 (or turn clipping on)")
        )
