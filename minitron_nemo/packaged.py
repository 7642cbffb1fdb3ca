"""The recipes shipped inside the package (`minitron_nemo/recipes/*.yaml`).

`minitron run` with no recipe runs the default one, also after a plain wheel install; a recipe
may be named by its file name without `.yaml` (`minitron run smollm2_135m_gpu`).
"""

from __future__ import annotations

from pathlib import Path

from minitron_nemo.errors import MinitronError

DEFAULT = "smollm2_135m_cpu"


def recipe_dir() -> Path:
    return Path(__file__).resolve().parent / "recipes"


def resolve_recipe(name: str | None) -> Path:
    """A recipe path: an existing file, or the name of a packaged recipe (default if None)."""
    if name is None:
        return recipe_dir() / f"{DEFAULT}.yaml"
    path = Path(name)
    if path.is_file():
        return path
    packaged = recipe_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise MinitronError(
        f"{name}: recipe not found (a YAML file, or one of the packaged recipes: "
        f"{', '.join(r for r, _ in list_recipes())})"
    )


def purpose(path: Path) -> str:
    """The first comment line of a recipe: its one-line purpose."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_recipes() -> list[tuple[str, str]]:
    """(name, purpose) of every packaged recipe."""
    return [(p.stem, purpose(p)) for p in sorted(recipe_dir().glob("*.yaml"))]
