"""`adakd distill --config rounds.yaml`: on-policy distillation in rounds through the cache.

Each round is three stages, each its own process (so teacher and student never share a device or a process;
a stage may get its own CUDA_VISIBLE_DEVICES):

  1. generate      the current student writes responses to the prompts         adakd generate
  2. cache-teacher the teacher scores the student's text, offline, into a cache  cache-teacher
  3. train-student the student trains on the off-policy cache (if any) mixed     train-student --cache ... --cache ...
                   with the on-policy cache(s), starting from the current student

and the next round starts from the student it trained. An optional warm-up stage first trains on the
off-policy cache alone (a random-init student generates nothing worth scoring).

Resumable at any stage: a finished stage is recorded in OUT/progress.json (written atomically after its
process exits 0) and skipped on a re-run; an unfinished one is run again with the same command, and every
stage resumes itself exactly (generate skips the records already written, cache-teacher the shards already
published, train-student continues from its last checkpoint). So `adakd distill` re-run after a kill at any
point ends where an uninterrupted run ends. On a cluster, `adakd distill --config rounds.yaml --print` prints
every stage's command, to be submitted as three jobs per round (docs/on-policy.md, Slurm dependencies).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRESS = "progress.json"


class RoundsError(Exception):
    """A rounds config that cannot run, or a stage that failed; the message says which and what to do."""


@dataclass
class RoundsConfig:
    teacher: str  # the teacher: a Hugging Face directory (run by cache-teacher)
    student: str  # the first student: a directory (pretrained) or a config.json (random init, with a warm-up)
    prompts: str  # jsonl of prompts (instruction or chat rows) the student answers each round
    out: str  # everything lands here: round-R/{samples.jsonl, cache, student}, progress.json
    rounds: int = 2
    off_policy: str | None = None  # a cache of teacher targets on ground-truth / teacher text, mixed into each round
    on_policy_weight: float = 0.5  # GKD's lambda: the share of sequences from on-policy caches (1 without off_policy)
    previous_rounds: bool = False  # mix every earlier round's on-policy cache too (equal shares), not only this one's
    warmup: dict[str, Any] | None = None  # train-student options of an off-policy warm-up before round 1
    generate: dict[str, Any] = field(default_factory=dict)  # adakd generate options (samples, temperature, ...)
    cache: dict[str, Any] = field(default_factory=dict)  # cache-teacher options (top_k, engine, ...)
    train: dict[str, Any] = field(default_factory=dict)  # train-student options (loss, adakd, max_steps, lr, ...)
    seed: int = 0  # generation seed of round R: seed + R
    devices: dict[str, str] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES per stage: generate, cache, train

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise RoundsError(f"rounds must be at least 1, not {self.rounds}")
        if not 0.0 < self.on_policy_weight <= 1.0:
            raise RoundsError(f"on_policy_weight must be within (0, 1], not {self.on_policy_weight}")
        if self.warmup is not None and not self.off_policy:
            raise RoundsError("warmup trains on the off-policy cache: give off_policy too")
        for name in ("generate", "cache", "train"):
            reserved = {"generate": {"model", "data", "out"}, "cache": {"teacher", "data", "out"},
                        "train": {"cache", "student", "out", "cache_weights"}}[name]
            clash = reserved & {k.replace("-", "_") for k in getattr(self, name)}
            if clash:
                raise RoundsError(f"{name}: {sorted(clash)} are set by the rounds themselves; remove them")

    @classmethod
    def load(cls, path: str) -> "RoundsConfig":
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RoundsError(f"--config {path}: cannot be read as YAML ({e})") from e
        if not isinstance(raw, dict):
            raise RoundsError(f"--config {path}: expected a mapping of options, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RoundsError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("teacher", "student", "prompts", "out") if k not in raw]
        if missing:
            raise RoundsError(f"--config {path}: missing {missing}")
        return cls(**raw)


@dataclass
class Stage:
    name: str  # "warmup", "round-1/generate", ...
    argv: list[str]  # the adakd command line (without the interpreter)
    device_role: str  # generate | cache | train


def _options(opts: dict[str, Any]) -> list[str]:
    """A dict of command options as command-line arguments: True -> --flag, False -> --no-flag, lists repeat."""
    args: list[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def plan(cfg: RoundsConfig) -> list[Stage]:
    """Every stage of every round, in order, as adakd command lines."""
    out = Path(cfg.out)
    stages: list[Stage] = []
    student = cfg.student
    if cfg.warmup is not None:
        warm = out / "warmup"
        stages.append(Stage("warmup", ["train-student", "--cache", cfg.off_policy, "--student", student, "--out",
                                       str(warm), "--no-progress", *_options(cfg.warmup)], "train"))
        student = str(warm / "final")
    on_caches: list[str] = []
    for r in range(1, cfg.rounds + 1):
        d = out / f"round-{r}"
        samples, cache = d / "samples.jsonl", d / "cache"
        stages.append(Stage(f"round-{r}/generate", ["generate", "--model", student, "--data", cfg.prompts, "--out",
                                                    str(samples), "--seed", str(cfg.seed + r),
                                                    *_options(cfg.generate)], "generate"))
        stages.append(Stage(f"round-{r}/cache-teacher", ["cache-teacher", "--teacher", cfg.teacher, "--data",
                                                         str(samples), "--out", str(cache), "--no-progress",
                                                         *_options(cfg.cache)], "cache"))
        on_caches = [*on_caches, str(cache)] if cfg.previous_rounds else [str(cache)]
        caches, weights = _mix(cfg, on_caches)
        argv = ["train-student", *(a for c in caches for a in ("--cache", c)), "--student", student, "--out",
                str(d / "student"), "--no-progress", *_options(cfg.train)]
        if len(caches) > 1:
            argv += ["--cache-weights", ",".join(f"{w:g}" for w in weights)]
        stages.append(Stage(f"round-{r}/train-student", argv, "train"))
        student = str(d / "student" / "final")
    return stages


def final_student(cfg: RoundsConfig) -> str:
    """Where the last round's student lands."""
    return str(Path(cfg.out) / f"round-{cfg.rounds}" / "student" / "final")


def _mix(cfg: RoundsConfig, on_caches: list[str]) -> tuple[list[str], list[float]]:
    """The caches of a round's training and their weights: the off-policy cache gets 1 - lambda, the
    on-policy ones share lambda equally."""
    share = cfg.on_policy_weight / len(on_caches)
    if cfg.off_policy and cfg.on_policy_weight < 1.0:
        return [cfg.off_policy, *on_caches], [1.0 - cfg.on_policy_weight, *([share] * len(on_caches))]
    return list(on_caches), [1.0 / len(on_caches)] * len(on_caches)


def _done(out: Path) -> list[str]:
    try:
        return json.loads((out / PROGRESS).read_text())["done"]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as e:
        raise RoundsError(f"{out / PROGRESS}: not a progress file ({e}); remove it to re-check every stage "
                          "(each stage resumes itself)") from e


def _mark_done(out: Path, done: list[str]) -> None:
    """Atomically: a crash leaves the old list or the new one, never half of either."""
    tmp = out / (PROGRESS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"done": done}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / PROGRESS)


def command(stage: Stage) -> list[str]:
    """The stage's process: this interpreter running adakd's commands."""
    return [sys.executable, "-m", "adakd.cli", *stage.argv]


def run(cfg: RoundsConfig, echo=print) -> list[str]:
    """Run every stage not yet done, each in its own process; returns the stages run now."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    ran = []
    for stage in plan(cfg):
        if stage.name in done:
            echo(f"[{stage.name}] done before; skipped")
            continue
        Path(stage.argv[stage.argv.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if stage.device_role in cfg.devices:
            env["CUDA_VISIBLE_DEVICES"] = str(cfg.devices[stage.device_role])
        echo(f"[{stage.name}] adakd {shlex.join(stage.argv)}")
        rc = subprocess.run(command(stage), env=env).returncode
        if rc != 0:
            raise RoundsError(f"[{stage.name}] exited with status {rc}; fix what it printed and re-run "
                              "adakd distill with the same config: finished stages are skipped and this one resumes")
        done.append(stage.name)
        _mark_done(out, done)
        ran.append(stage.name)
    return ran
