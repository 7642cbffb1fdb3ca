"""`minitron validate`: load recipes with every check of config.py, without running anything.

Every command applies the same checks when it loads its recipe; this command only reports them
(CI validates every packaged recipe). It imports neither torch nor megatron.
"""

from __future__ import annotations

from pathlib import Path

from minitron_nemo.config import RunConfig, load_config


def validate_recipe(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Load the recipe with every check; raise MinitronError on the first broken rule."""
    return load_config(path, overrides)
