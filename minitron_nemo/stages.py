"""`minitron run`: the whole chain as stages that each read and write one directory.

    teacher  -> HF teacher converted to megatron (run_dir/teacher)
    data     -> indexed datasets (text prepared with the teacher's tokenizer), megatron's
                train / test sample indices built once; ranks read samples from them
    correct  -> (optional) teacher correction: the teacher fine-tuned with the LM loss
    prune    -> importance, pruned checkpoint, prune report and plots
    distill  -> the pruned student distilled from the teacher
    scratch  -> the same architecture from random init, LM loss, same data and steps
    export   -> HF directories of the distilled student (and the scratch baseline)
    eval     -> held-out loss / perplexity and multiple-choice accuracy of every model
    report   -> report.md (table) + PNGs

Each stage records what it consumed (`stage.json`: the config fields it reads, the fingerprints
of the stages it reads from, the package version; see fingerprint.py). A complete stage (DONE
marker) with the same fingerprint is skipped; one whose fingerprint changed reruns, and so does
everything downstream, with one log line naming what changed. An interrupted training stage
resumes from its checkpoints when its fingerprint is unchanged. `--from STAGE` forces STAGE and
all later ones. Paths inside the run directory are relative to it, so it can be moved.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from minitron_nemo import atomic
from minitron_nemo.config import RunConfig, to_yaml
from minitron_nemo.errors import MinitronError
from minitron_nemo.fingerprint import Fingerprint, changes, fingerprints

log = logging.getLogger(__name__)
STAGES = ("teacher", "data", "correct", "prune", "distill", "scratch", "export", "eval", "report")
RESUMABLE = frozenset({"correct", "distill", "scratch"})
"""Interrupted with an unchanged fingerprint: resume from the last complete checkpoint."""
KEPT_WHEN_STALE = frozenset({"data"})
"""Not wiped when stale: the data stage reuses datasets it already tokenised (their PREFIX.json
names source and tokenizer) and rebuilds everything else."""
RECORD = "stage.json"


def read_record(stage_dir: Path) -> dict | None:
    path = stage_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


class Pipeline:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)

    # -- paths -------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def teacher_ckpt(self) -> Path:
        if self.cfg.teacher_correction.enabled:
            return self.final_checkpoint("correct")
        return self.stage_dir("teacher")

    def data_spec(self):
        """What ranks read samples with (paths and numbers; see data/datasets.py)."""
        from minitron_nemo.data.stage import load_spec

        record = json.loads((self.stage_dir("data") / "data.json").read_text())
        return load_spec(record, self.dir)

    def enabled(self, stage: str) -> bool:
        if stage == "correct":
            return self.cfg.teacher_correction.enabled
        if stage == "scratch":
            return self.cfg.scratch
        return True

    def fingerprints(self) -> dict[str, Fingerprint]:
        return fingerprints(self.cfg, {s: self.enabled(s) for s in STAGES})

    def plan(self, from_stage: str | None = None) -> dict[str, tuple[str, str]]:
        """stage -> (action, why): skip | run | rerun | resume, for every enabled stage."""
        plan: dict[str, tuple[str, str]] = {}
        forced = False
        for stage, fp in self.fingerprints().items():
            forced = forced or stage == from_stage
            out = self.stage_dir(stage)
            record = read_record(out)
            same = record is not None and record.get("digest") == fp.digest
            if forced:
                plan[stage] = ("rerun", "--from")
            elif atomic.is_complete(out) and same:
                plan[stage] = ("skip", "complete")
            elif record is None and atomic.is_complete(out):
                plan[stage] = ("rerun", "no record of what it was made from")
            elif record is not None and not same:
                fields, upstream = changes(record, fp)
                why = ", ".join(fields) or (
                    f"upstream {', '.join(upstream)} changed" if upstream else "fingerprint changed"
                )
                plan[stage] = ("rerun", why)
            elif record is not None and stage in RESUMABLE:
                plan[stage] = ("resume", "interrupted, same fingerprint")
            else:
                plan[stage] = ("run", "missing")
        return plan

    # -- running -----------------------------------------------------------------------
    def run(self, from_stage: str | None = None, until: str | None = None) -> None:
        """Run every enabled stage in order up to `until` (see the module docstring)."""
        for name, value in (("--from", from_stage), ("until", until)):
            if value is not None and value not in STAGES:
                raise MinitronError(f"{name}: expected one of {STAGES}, got {value!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(self.cfg))
        log.info("run directory %s; resolved config:\n%s", self.dir, to_yaml(self.cfg))
        prints = self.fingerprints()
        plan = self.plan(from_stage)
        stages = list(plan)  # enabled stages in order
        for i, stage in enumerate(stages):
            action, why = plan[stage]
            if action == "rerun" and why != "--from" and not why.startswith("upstream"):
                later = sum(plan[s][0] != "skip" for s in stages[i + 1 :])
                log.info("%s: %s, rerunning %s and %d later stages", stage, why, stage, later)
        last = STAGES.index(until) if until else len(STAGES) - 1
        order = [s for s in stages if STAGES.index(s) <= last]
        for stage in order:
            action, why = plan[stage]
            out = self.stage_dir(stage)
            if action == "skip":
                log.info("stage %s: complete, skipped (%s)", stage, out)
                continue
            if action in ("rerun", "run") and out.exists():
                if stage in KEPT_WHEN_STALE and why != "--from":
                    (out / atomic.DONE).unlink(missing_ok=True)
                else:
                    shutil.rmtree(out)
            record = prints[stage].record()
            if stage in RESUMABLE or stage in KEPT_WHEN_STALE:  # lets a restart resume
                out.mkdir(parents=True, exist_ok=True)
                (out / RECORD).write_text(json.dumps(record, indent=2))
            verb = "resuming" if action == "resume" else "running"
            log.info("stage %s: %s (%s)", stage, verb, why)
            start = time.time()
            getattr(self, f"stage_{stage}")(out)
            record["seconds"] = time.time() - start
            out.mkdir(parents=True, exist_ok=True)
            (out / RECORD).write_text(json.dumps(record, indent=2))
            (out / atomic.DONE).write_text("ok\n")
            log.info("stage %s: done in %.1f s", stage, record["seconds"])

    # -- stages ------------------------------------------------------------------------
    def teacher_hf_dir(self) -> Path:
        if self.cfg.teacher == "smollm2":
            from minitron_nemo.data.sources import smollm2_hf_dir

            return smollm2_hf_dir()
        return Path(self.cfg.teacher)

    def stage_teacher(self, out: Path) -> None:
        from minitron_nemo.convert.hf_to_mcore import hf_to_mcore

        p = self.cfg.parallel
        hf_to_mcore(self.teacher_hf_dir(), out, tp=p.tp, pp=p.pp, dtype=self.cfg.dtype, ep=p.ep)

    def stage_data(self, out: Path) -> None:
        from minitron_nemo.data.stage import run_data_stage
        from minitron_nemo.models.arch import ModelArch

        teacher = self.stage_dir("teacher")
        run_data_stage(
            self.cfg.data,
            teacher / "tokenizer",
            out,
            self.dir,
            ModelArch.load(teacher / "arch.yaml").vocab_size,
        )
        if self.cfg.eval.tasks:  # the benchmarks' data, now, not at eval time
            from minitron_nemo.eval.benchmarks import fetch_task_data

            fetch_task_data(list(self.cfg.eval.tasks), self.cfg.eval.mmlu_subjects)

    def _train(
        self,
        student: Path,
        out: Path,
        mode: str,
        teacher: Path | None,
        init_random: bool = False,
        **overrides,
    ):
        import dataclasses

        from minitron_nemo.distill.train import train

        if mode != "distill":  # a teacher cache only feeds distillation
            overrides.setdefault("teacher_cache", None)
        cfg = dataclasses.replace(self.cfg.distill, mode=mode, **overrides)
        p = self.cfg.parallel
        return train(
            student,
            out,
            cfg,
            self.data_spec(),
            teacher,
            tp=p.tp,
            pp=p.pp,
            dp=p.dp,
            resume=True,
            init_random=init_random,
            sequence_parallel=p.sequence_parallel,
            ep=p.ep,
        )

    def stage_correct(self, out: Path) -> None:
        tc = self.cfg.teacher_correction
        final = self._train(
            self.stage_dir("teacher"),
            out / "train",
            "teacher_correction",
            None,
            steps=tc.steps,
            lr=tc.lr,
            min_lr=tc.lr / 10,
            warmup_steps=tc.warmup_steps,
        )
        self._point_at(out, final)

    def stage_prune(self, out: Path) -> None:
        from minitron_nemo.prune.stage import run_prune

        p = self.cfg.parallel
        run_prune(
            self.teacher_ckpt, out, self.cfg.prune, self.data_spec(), tp=p.tp, pp=p.pp,
            distill=self.cfg.distill, dp=p.dp, ep=p.ep,
        )  # fmt: skip

    def stage_distill(self, out: Path) -> None:
        final = self._train(self.stage_dir("prune") / "ckpt", out, "distill", self.teacher_ckpt)
        self._point_at(out, final)

    def stage_scratch(self, out: Path) -> None:
        final = self._train(self.stage_dir("prune") / "ckpt", out, "lm", None, init_random=True)
        self._point_at(out, final)

    def _point_at(self, out: Path, final: Path) -> None:
        """Record the stage's final checkpoint relative to the run directory (no copy)."""
        (out / "final.txt").write_text(str(final.resolve().relative_to(self.dir.resolve())))

    def final_checkpoint(self, stage: str) -> Path:
        return self.dir / (self.stage_dir(stage) / "final.txt").read_text().strip()

    def stage_export(self, out: Path) -> None:
        from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

        out.mkdir(parents=True)
        mcore_to_hf(self.final_checkpoint("distill"), out / "student")
        if self.cfg.scratch:
            mcore_to_hf(self.final_checkpoint("scratch"), out / "scratch")
        if self.cfg.teacher_correction.enabled:
            mcore_to_hf(self.teacher_ckpt, out / "teacher_corrected")

    def models_to_evaluate(self) -> dict[str, tuple[Path, Path | None]]:
        """name -> (megatron checkpoint, HF directory or None)."""
        models = {"teacher": (self.stage_dir("teacher"), self.teacher_hf_dir())}
        export = self.stage_dir("export")
        if self.cfg.teacher_correction.enabled:
            models["teacher (corrected)"] = (self.teacher_ckpt, export / "teacher_corrected")
        prune_hf = self.stage_dir("prune") / "hf"
        models["pruned (no training)"] = (
            self.stage_dir("prune") / "ckpt",
            prune_hf if self.cfg.prune.hf_output else None,
        )
        models["distilled"] = (self.final_checkpoint("distill"), export / "student")
        if self.cfg.scratch:
            models["scratch (LM, same tokens)"] = (
                self.final_checkpoint("scratch"),
                export / "scratch",
            )
        return models

    def stage_eval(self, out: Path) -> None:
        """Held-out loss by megatron-core on the run's ranks (from the checkpoints); benchmarks
        by lm-evaluation-harness on the HF exports (task data fetched before, never now)."""
        from minitron_nemo.eval.heldout import heldout_losses

        e, p = self.cfg.eval, self.cfg.parallel
        models = self.models_to_evaluate()
        with atomic.atomic_directory(out) as tmp:
            results = heldout_losses(
                {name: ckpt for name, (ckpt, _hf) in models.items()},
                self.data_spec(),
                tmp / "heldout.json",
                e.heldout_batch_size,
                p.tp,
                p.pp,
                p.dp,
                p.ep,
            )
            for name, entry in results.items():
                log.info("eval %s: held-out loss %.3f", name, entry["heldout_loss"])
                entry["tasks"] = {}
            if e.tasks:
                from minitron_nemo.eval.benchmarks import (
                    fetch_task_data,
                    run_benchmarks,
                    write_task_configs,
                )

                fetch_task_data(list(e.tasks), e.mmlu_subjects, download=False)
                names = write_task_configs(tmp / "tasks", list(e.tasks), e.mmlu_subjects)
                skip = set() if e.benchmark_pruned else {"pruned (no training)"}
                for name, (_ckpt, hf_dir) in models.items():
                    if hf_dir is not None and name not in skip:
                        results[name]["tasks"] = run_benchmarks(
                            hf_dir, tmp / "tasks", names, e.limit, e.batch_size, e.device
                        )
            (tmp / "results.json").write_text(json.dumps(results, indent=2))

    def stage_report(self, out: Path) -> None:
        from minitron_nemo.report.run_report import write_report

        with atomic.atomic_directory(out) as tmp:
            table = write_report(self.dir, tmp)
        print(table)
