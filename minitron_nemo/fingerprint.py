"""What each stage of a run consumed: config fields, upstream stages, the package version.

A stage's fingerprint is a digest of (the config fields it reads, the fingerprints of the stages
it reads from, the package version). It is computed from the config alone, so a whole run's
fingerprints are known before anything runs: a complete stage whose recorded fingerprint differs
is stale and reruns, and so does everything downstream of it (their upstream digests change).
The record (`stage.json` in the stage directory) keeps the inputs, so a rerun can say which
field changed. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from minitron_nemo import __version__

# Config fields a stage reads ("prune" = every prune.* field). Paths of the run directory itself
# (`run_dir`, `name`) are never inputs, so a moved run directory keeps its fingerprints.
TRAINING = (
    "distill.micro_batch_size",
    "distill.global_batch_size",
    "distill.lr_decay_style",
    "distill.weight_decay",
    "distill.clip_grad",
    "distill.adam_beta2",
    "distill.seed",
    "distill.fp8",
    "parallel",
)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher", "dtype", "parallel.tp", "parallel.pp", "parallel.ep"),
    "data": ("teacher", "data"),  # the teacher's tokenizer and vocabulary
    "correct": ("teacher_correction", *TRAINING),
    "prune": ("prune", "parallel.tp", "parallel.pp"),
    "distill": ("distill", "parallel"),
    "scratch": ("distill", "parallel"),
    "export": (),
    "eval": ("eval", "teacher"),
    "report": (),
}
# Fields under a stage's prefixes that change only what is drawn, never what the stage computes:
# not inputs (turning them on or off reruns nothing, and a run made before they existed keeps
# its fingerprints).
NOT_INPUTS = frozenset({"prune.plots"})
STAGE_UPSTREAM: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "data": (),
    "correct": ("teacher", "data"),
    "prune": ("teacher", "correct", "data"),
    "distill": ("teacher", "correct", "prune", "data"),
    "scratch": ("prune", "data"),
    "export": ("correct", "distill", "scratch"),
    "eval": ("correct", "prune", "export", "data"),
    "report": ("teacher", "data", "correct", "prune", "distill", "scratch", "export", "eval"),
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


@dataclass(frozen=True)
class Fingerprint:
    stage: str
    digest: str
    inputs: dict[str, Any]
    upstream: dict[str, str | None]
    """Digest of each upstream stage (None: the stage is disabled in this run)."""
    version: str

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _selected(flat: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    return {
        key: value
        for key, value in sorted(flat.items())
        if any(key == p or key.startswith(p + ".") for p in prefixes) and key not in NOT_INPUTS
    }


def fingerprints(cfg, enabled: dict[str, bool]) -> dict[str, Fingerprint]:
    """The fingerprint of every enabled stage of `cfg` (a RunConfig), in stage order."""
    flat = flatten(dataclasses.asdict(cfg))
    out: dict[str, Fingerprint] = {}
    for stage, prefixes in STAGE_INPUTS.items():
        if not enabled.get(stage, True):
            continue
        if stage == "prune" and cfg.prune.search is not None:  # it distills candidates
            prefixes = (*prefixes, "distill", "parallel")
        inputs = _selected(flat, prefixes)
        upstream = {
            up: (out[up].digest if up in out else None)
            for up in STAGE_UPSTREAM[stage]
            if enabled.get(up, True) or up in out
        }
        blob = json.dumps([stage, inputs, upstream, __version__], sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        out[stage] = Fingerprint(stage, digest, inputs, upstream, __version__)
    return out


def changes(recorded: dict[str, Any], current: Fingerprint) -> tuple[list[str], list[str]]:
    """(changed own inputs as 'key old -> new', changed upstream stages) between a stage's
    record and its current fingerprint."""
    old_inputs = recorded.get("inputs", {})
    fields = [
        f"{key} {_show(old_inputs.get(key))} -> {_show(current.inputs.get(key))}"
        for key in sorted(set(old_inputs) | set(current.inputs))
        if old_inputs.get(key) != current.inputs.get(key)
    ]
    if recorded.get("version") != current.version:
        fields.append(f"package version {recorded.get('version')} -> {current.version}")
    old_up = recorded.get("upstream", {})
    upstream = [
        up
        for up in sorted(set(old_up) | set(current.upstream))
        if old_up.get(up) != current.upstream.get(up)
    ]
    return fields, upstream


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
