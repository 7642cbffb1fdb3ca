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

A stage is skipped when its directory is complete (DONE marker); `--from STAGE` reruns it and
all later ones.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from minitron_nemo import checkpoint
from minitron_nemo.config import RunConfig, to_yaml
from minitron_nemo.errors import MinitronError

log = logging.getLogger(__name__)
STAGES = ("teacher", "data", "correct", "prune", "distill", "scratch", "export", "eval", "report")
# Kept on a rerun: training resumes from checkpoints, data reuses what it already tokenised.
RESUMABLE = frozenset({"data", "correct", "distill", "scratch"})


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
            return self.stage_dir("correct") / "ckpt"
        return self.stage_dir("teacher")

    def data_spec(self):
        """What ranks read samples with (paths and numbers; see data/datasets.py)."""
        from minitron_nemo.data.stage import load_spec

        record = json.loads((self.stage_dir("data") / "data.json").read_text())
        return load_spec(record, self.dir)

    def train_samples(self) -> int:
        """Samples of the train split: enough for the longest training and for calibration."""
        gbs = self.cfg.distill.global_batch_size
        steps = [self.cfg.distill.steps]
        if self.cfg.teacher_correction.enabled:
            steps.append(self.cfg.teacher_correction.steps)
        return max(max(steps) * gbs, self.cfg.data.calibration_samples)

    def enabled(self, stage: str) -> bool:
        if stage == "correct":
            return self.cfg.teacher_correction.enabled
        if stage == "scratch":
            return self.cfg.scratch
        return True

    # -- running -----------------------------------------------------------------------
    def run(self, from_stage: str | None = None, until: str | None = None) -> None:
        """Run every enabled stage in order (skipping complete ones) up to `until`."""
        for name, value in (("--from", from_stage), ("until", until)):
            if value is not None and value not in STAGES:
                raise MinitronError(f"{name}: expected one of {STAGES}, got {value!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(self.cfg))
        log.info("run directory %s; resolved config:\n%s", self.dir, to_yaml(self.cfg))
        rerun = False
        last = STAGES.index(until) if until else len(STAGES) - 1
        for stage in STAGES[: last + 1]:
            rerun = rerun or stage == from_stage
            if not self.enabled(stage):
                continue
            out = self.stage_dir(stage)
            if checkpoint.is_complete(out) and not rerun:
                log.info("stage %s: complete, skipped (%s)", stage, out)
                continue
            if out.exists() and (stage not in RESUMABLE or rerun):
                shutil.rmtree(out)
            log.info("stage %s: running", stage)
            start = time.time()
            getattr(self, f"stage_{stage}")(out)
            seconds = time.time() - start
            if not checkpoint.is_complete(out):
                out.mkdir(parents=True, exist_ok=True)
                (out / checkpoint.DONE).write_text("ok\n")
            (out / "stage.json").write_text(json.dumps({"stage": stage, "seconds": seconds}))
            log.info("stage %s: done in %.1f s", stage, seconds)

    def stage_seconds(self) -> dict[str, float]:
        out = {}
        for stage in STAGES:
            path = self.stage_dir(stage) / "stage.json"
            if path.is_file():
                out[stage] = json.loads(path.read_text())["seconds"]
        return out

    # -- stages ------------------------------------------------------------------------
    def teacher_hf_dir(self) -> Path:
        if self.cfg.teacher == "smollm2":
            from minitron_nemo.data.sources import smollm2_hf_dir

            return smollm2_hf_dir()
        return Path(self.cfg.teacher)

    def stage_teacher(self, out: Path) -> None:
        from minitron_nemo.convert.hf_to_mcore import hf_to_mcore

        p = self.cfg.parallel
        hf_to_mcore(self.teacher_hf_dir(), out, tp=p.tp, pp=p.pp, dtype=self.cfg.dtype)

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
            self.train_samples(),
        )

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
            save_every=tc.steps,
        )
        shutil.copytree(final, out / "ckpt")

    def stage_prune(self, out: Path) -> None:
        from minitron_nemo.prune.stage import run_prune

        p = self.cfg.parallel
        run_prune(self.teacher_ckpt, out, self.cfg.prune, self.data_spec(), tp=p.tp, pp=p.pp)

    def stage_distill(self, out: Path) -> None:
        final = self._train(self.stage_dir("prune") / "ckpt", out, "distill", self.teacher_ckpt)
        (out / "final.txt").write_text(str(final))

    def stage_scratch(self, out: Path) -> None:
        final = self._train(self.stage_dir("prune") / "ckpt", out, "lm", None, init_random=True)
        (out / "final.txt").write_text(str(final))

    def final_checkpoint(self, stage: str) -> Path:
        return Path((self.stage_dir(stage) / "final.txt").read_text().strip())

    def stage_export(self, out: Path) -> None:
        from minitron_nemo.convert.mcore_to_hf import mcore_to_hf

        out.mkdir(parents=True)
        mcore_to_hf(self.final_checkpoint("distill"), out / "student")
        if self.cfg.scratch:
            mcore_to_hf(self.final_checkpoint("scratch"), out / "scratch")
        if self.cfg.teacher_correction.enabled:
            mcore_to_hf(self.teacher_ckpt, out / "teacher_corrected")

    def models_to_evaluate(self) -> dict[str, Path]:
        models = {"teacher": self.teacher_hf_dir()}
        if self.cfg.teacher_correction.enabled:
            models["teacher (corrected)"] = self.stage_dir("export") / "teacher_corrected"
        models["pruned (no training)"] = self.stage_dir("prune") / "hf"
        models["distilled"] = self.stage_dir("export") / "student"
        if self.cfg.scratch:
            models["scratch (LM, same tokens)"] = self.stage_dir("export") / "scratch"
        return models

    def stage_eval(self, out: Path) -> None:
        from transformers import AutoTokenizer

        from minitron_nemo.data.datasets import heldout_indices, heldout_reader
        from minitron_nemo.eval.lm import heldout_loss, load_hf_model
        from minitron_nemo.eval.mc import load_task, score_questions

        spec = self.data_spec()
        reader = heldout_reader(spec)
        tasks = {t: load_task(t, self.cfg.eval.limit) for t in self.cfg.eval.tasks}
        results = {}
        for name, hf_dir in self.models_to_evaluate().items():
            start = time.time()
            model = load_hf_model(hf_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
            batches = reader.batches(heldout_indices(spec), self.cfg.eval.heldout_batch_size)
            loss = heldout_loss(model, batches)
            entry = {
                "params": sum(p.numel() for p in model.parameters()),
                "heldout_loss": loss,
                "heldout_ppl": math.exp(loss),
                "tasks": {t: score_questions(model, tokenizer, qs) for t, qs in tasks.items()},
            }
            entry["seconds"] = time.time() - start
            results[name] = entry
            log.info(
                "eval %s: loss %.3f %s",
                name,
                loss,
                {t: r["acc"] for t, r in entry["tasks"].items()},
            )
        with checkpoint.atomic_directory(out) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2))

    def stage_report(self, out: Path) -> None:
        from minitron_nemo.report.run_report import write_report

        with checkpoint.atomic_directory(out) as tmp:
            table = write_report(self, tmp)
        print(table)
