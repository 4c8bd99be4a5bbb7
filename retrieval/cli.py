"""Shared ``python -m`` plumbing for Sparrow's Hydra entry points (retrieval and recsys alike).

Bad input ends as one log line and exit code 2, never a traceback; a config-group override
naming no file (``+experiment=NAME``, ``index=NAME``) fails before Hydra starts, listing the
available options.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from retrieval.data.errors import DataFormatError, DatasetNotFoundError
from retrieval.data.teacher_scores import TeacherScoresError
from retrieval.data.training import TrainingDataError
from retrieval.index.manifest import IndexFormatError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A config value or command-line override that cannot work."""


# errors of the user's input: one line on the log and exit code 2, no traceback
USER_ERRORS: tuple[type[Exception], ...] = (
    DataFormatError,
    DatasetNotFoundError,
    ConfigError,
    IndexFormatError,
    TrainingDataError,
    TeacherScoresError,
)


def check_overrides(args: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse a config-group override (``+experiment=NAME``, ``model=NAME``) naming no file.

    Raises:
        ConfigError: naming the group, the value and the available options.
    """
    for arg in args:
        m = re.fullmatch(r"\+{0,2}([A-Za-z_][\w/]*)=(.*)", arg)
        if not m or not (conf_dir / m.group(1)).is_dir() or "(" in m.group(2):
            continue
        group, values = m.groups()
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        for value in values.split(","):
            if value not in options and value != "null":
                raise ConfigError(f"unknown {group} '{value}' in {arg}; available: {', '.join(options)}")


def fail(err: Exception) -> None:
    """Log ``err`` as one line and exit with code 2 (bad input, not a crash)."""
    if not logging.getLogger().handlers:  # before Hydra has configured logging
        logging.basicConfig(format="[%(name)s][%(levelname)s] - %(message)s")
    log.error("%s", err)
    sys.exit(2)


def entry_point(
    config_name: str,
    run_fn: Callable[[DictConfig], object],
    user_errors: tuple[type[Exception], ...] = USER_ERRORS,
) -> Callable[[], None]:
    """A ``python -m`` main over ``conf/<config_name>.yaml``.

    Unknown config-group options fail before Hydra starts, and bad input (``user_errors``)
    ends as one log line with exit code 2, never a traceback.
    """

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            run_fn(cfg)
        except user_errors as err:
            fail(err)

    def main() -> None:
        try:
            check_overrides(sys.argv[1:])
        except ConfigError as err:
            fail(err)
        _main()

    return main
