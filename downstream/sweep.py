"""``downstream sweep``: Ray Tune trials of a task's head with an ASHA scheduler.

Any head a task supports is swept: linear/MLP heads with feature- or label-level fusion, plane
experts with gating, EHR fusion, partial fine-tuning of backbone blocks, segmentation decoders.
Trials get a small config (task name, ``key=value`` overrides, sampled parameters) and read the
preprocessed volumes and frozen-backbone features from the on-disk cache, which the driver fills
once per distinct feature setting before any trial starts. Each trial trains the head with the
task's own training code (no baselines) and scores it on the *selection* split (``val`` by
default, never the test split): a single frozen-feature model every ``report_every`` epochs, which
ASHA uses to stop weak trials early; heads trained in stages or on volumes once, at the end (ASHA
then cannot stop them early). With EHR the selection model is the fused one. The run folder gets
``trials.csv``, ``best.json`` (parameters and the overrides that re-create the best head) and
``metrics.json``; ``downstream finetune --task T --from-sweep <run>`` trains and tests that head.
Running the same command again resumes an interrupted sweep.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from shards.config import ConfigError, load_config, save_config, to_dict
from shards.resume import check_resume, saved_yaml
from shards.runs import default_folder, write_metrics
from shards.tracking import WandbConfig, start_tracking

from .data import check_task, load_studies, select_rows, split_rows
from .diagnosis import feature_batcher, run_diagnosis
from .features import FeatureCache
from .finetune import resolve_task
from .heads.fusion import build_feature_model
from .inputs import prepare_planes
from .labels import label_loss, output_task, to_probs
from .metrics import diagnosis_metrics
from .segment import run_segmentation
from .studies.trials import absolute_paths
from .tasks import TaskConfig
from .train import fit, pos_weights, predict, seed_everything
from .tuning import RayConnection, run_tuner, trial_rows

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
# Parameters that change the cached features: swept over discrete values, precomputed by the driver.
FEATURE_KEYS = ("features.timesteps", "features.blocks", "features.noise_draws", "features.seed",
                "features.per_plane", "planes", "backbones")
# Selection metrics per task kind (higher is better); the first is the default.
METRICS = {"diagnosis": ("auroc", "ap"), "segmentation": ("dice", "iou")}
RESUME_IGNORE = ("resources", "max_concurrent_trials", "ray", "wandb")  # a resumed sweep may change only these


@dataclass
class ASHASpec:
    """ASHA over reports: a trial reports every ``report_every`` epochs, for ``max_t`` epochs (0: the
    task's ``train.epochs``); ``grace_period`` reports before ASHA may stop it."""

    max_t: int = 0
    grace_period: int = 2
    reduction_factor: float = 2.0
    report_every: int = 1

    def rungs(self, epochs: int) -> int:
        """ASHA's ``max_t`` in reports for a task of ``epochs``, checked before Ray starts."""
        budget, key = (self.max_t, "scheduler.max_t") if self.max_t else (epochs, "train.epochs")
        if self.report_every < 1 or self.reduction_factor <= 1:
            raise ConfigError("sweep: keys 'scheduler.report_every' (>= 1) and 'scheduler.reduction_factor' (> 1): "
                              f"got {self.report_every} and {self.reduction_factor}")
        reports = budget // self.report_every
        if not 1 <= self.grace_period <= reports:
            raise ConfigError(
                f"sweep: key 'scheduler.grace_period' ({self.grace_period} reports) must lie in [1, {reports}]: "
                f"'{key}' {budget} epochs / 'scheduler.report_every' {self.report_every} = {reports} reports; "
                f"lower 'scheduler.grace_period' or 'scheduler.report_every', or raise '{key}'")
        return reports


@dataclass
class SweepConfig:
    task: str = ""
    name: str = ""
    out: str = field(default_factory=default_folder("sweep"))
    overrides: list[str] = field(default_factory=list)
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = ""            # "" = the task kind's first of METRICS (auroc, dice)
    model: str = ""             # the model a trial is selected on; "" = diffusion+ehr with EHR, else diffusion
    select_split: str = "val"
    scheduler: ASHASpec = field(default_factory=ASHASpec)
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0})
    max_concurrent_trials: int = 2
    seed: int = 0
    ray: RayConnection = field(default_factory=RayConnection)
    wandb: WandbConfig = field(default_factory=WandbConfig)   # W&B record of the sweep (trials, best)

    def validate(self) -> None:
        if not self.space:
            raise ConfigError("sweep: space is empty; give at least one task key, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
        for key, dist in self.space.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ConfigError(f"sweep: space.{key} must be one of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {dist}")
            kind, values = next(iter(dist.items()))
            if kind in ("uniform", "loguniform", "randint") and (not isinstance(values, list) or len(values) != 2):
                raise ConfigError(f"sweep: space.{key}.{kind} needs [low, high], got {values}")
            if key.startswith(FEATURE_KEYS) and kind not in ("grid", "choice"):
                raise ConfigError(f"sweep: space.{key} changes the cached features; sweep it with grid or choice")
        if self.select_split == "test":
            raise ConfigError("sweep: key 'select_split' may not be the test split (it chooses the head)")
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ConfigError("sweep: num_samples and max_concurrent_trials must be >= 1")


def load_sweep(space_yaml: str | Path | None, task: str, overrides: Sequence[str] = ()) -> SweepConfig:
    """The sweep config; ``overrides`` naming a sweep key (``num_samples=8``) set the sweep, the
    others (``train.epochs=20``) are appended to the task overrides of every trial."""
    sweep_keys = set(SweepConfig.__dataclass_fields__) - {"task"}
    mine = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in sweep_keys]
    cfg = load_config(SweepConfig, space_yaml, mine, base={"task": task})
    cfg.overrides = list(cfg.overrides) + [o for o in overrides if o not in mine]
    return cfg


def param_space(cfg: SweepConfig) -> dict:
    from ray import tune

    build = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: build[kind](list(values)) for key, dist in cfg.space.items() for kind, values in dist.items()}


def param_overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]


def trial_task(task_name: str, overrides: Sequence[str], params: dict, select_split: str) -> TaskConfig:
    """The trial's task: any head the task supports, evaluated on the selection split, without the
    baselines and the reference probe (``head.kind=logistic`` sweeps the probe itself)."""
    return resolve_task(task_name, [*overrides, *param_overrides(params), f"train.eval_split={select_split}",
                                    "baselines.names=[]", "probe.enabled=false"])


def per_epoch(task: TaskConfig) -> bool:
    """One frozen-feature model with one weight decay: scored every ``report_every`` epochs, so ASHA
    can stop it early. Heads trained in stages, on volumes or over a weight-decay grid (EHR fusion,
    plane experts, partial fine-tuning, segmentation, the probe) run the task's own training and
    report once, at the end."""
    return (task.kind == "diagnosis" and not task.head.finetune_blocks and not task.ehr.enabled
            and task.head.kind != "logistic" and len(task.train.weight_decay_grid) == 1
            and not (task.fusion.kind == "experts" and len(task.planes) > 1))


def selection_target(cfg: SweepConfig, task: TaskConfig) -> tuple[str, str]:
    """(metric, model) a trial is selected on, checked against the task before Ray starts."""
    metric = cfg.metric or METRICS[task.kind][0]
    if metric not in METRICS[task.kind]:
        raise ConfigError(f"sweep: key 'metric' '{metric}' does not score a {task.kind} task; "
                          f"known: {', '.join(METRICS[task.kind])}")
    models = ["diffusion", "ehr_only", "diffusion+ehr"] if task.ehr.enabled else ["diffusion"]
    model = cfg.model or models[-1]
    if model not in models:
        raise ConfigError(f"sweep: key 'model' '{model}' is not trained by task '{task.name}'; known: {', '.join(models)}")
    return metric, model


def selection_scores(task: TaskConfig, frame: pd.DataFrame, planes: dict, train_rows: np.ndarray,
                     sweep_rows: np.ndarray) -> dict[str, dict[str, float]]:
    """Train the task's models as ``finetune`` does (no baselines; epochs and weight decay chosen on
    ``train.select_split``) and score each on the sweep's selection rows (the trial's evaluation
    split): ``{model: {metric: value}}`` (macro over labels, or mean over structures per case)."""
    if task.kind == "segmentation":
        results = run_segmentation(task, frame, planes[task.planes[0]], train_rows, sweep_rows)
        return {name: {m: _case_mean(r["scores"][m]) for m in METRICS["segmentation"]} for name, r in results.items()}
    rows = {"train": train_rows, "select": select_rows(frame, task), "eval": sweep_rows}
    results = run_diagnosis(task, frame, planes, rows)
    chosen = frame.iloc[sweep_rows][["patient", *task.labels]].reset_index(drop=True)
    out = {}
    for name, r in results.items():
        scored = chosen.assign(**{f"p_{n}": r["probs"][:, k] for k, n in enumerate(task.labels)})
        macro = diagnosis_metrics(scored, task.labels, "p_", n_boot=0)["macro"]
        out[name] = {m: float(macro[m]) for m in METRICS["diagnosis"]}
    return out


def _case_mean(arr: np.ndarray) -> float:
    arr = np.where(np.isfinite(arr), arr, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case without any structure: NaN, skipped
        return float(np.nanmean(np.nanmean(arr, axis=1)))


def sweep_trial(config: dict) -> None:
    """Ray Tune trainable: train the trial's head on the cached inputs, report the selection metric."""
    from ray import tune

    task = trial_task(config["task"], config["overrides"], config["params"], config["select_split"])
    manifest = check_task(task)
    frame = load_studies(task)
    train_rows, sweep_rows = split_rows(frame, task)
    planes = prepare_planes(task, list(frame["key"]), manifest, FeatureCache(task.cache_dir))
    task = output_task(task, manifest)  # multiclass labels as their class outputs (downstream.labels)
    metric, model_name = config["metric"], config["model"]
    if not per_epoch(task):
        scores = selection_scores(task, frame, planes, train_rows, sweep_rows)
        value = scores[model_name][metric]
        tune.report({"score": float(np.nan_to_num(value, nan=0.0)), metric: value, "model": model_name,
                     "epoch": task.train.epochs, **{f"{n}/{metric}": s[metric] for n, s in scores.items()}})
        return
    y = frame[task.labels].to_numpy(np.float32)
    batcher = feature_batcher({p: d.features for p, d in planes.items()}, y)
    seed_everything(task.train.seed)
    model = build_feature_model(task.fusion.kind, {p: d.channels() for p, d in planes.items()}, len(task.labels),
                                task.head, task.features.pooling, task.fusion)
    chosen = frame.iloc[sweep_rows][["patient", *task.labels]].reset_index(drop=True)
    every, epochs = config["report_every"], task.train.epochs

    def report(epoch: int, loss: float) -> None:
        if epoch % every and epoch != epochs:
            return
        probs = to_probs(predict(model, batcher, sweep_rows), task.labels).numpy()
        scored = chosen.assign(**{f"p_{n}": probs[:, k] for k, n in enumerate(task.labels)})
        macro = diagnosis_metrics(scored, task.labels, "p_", n_boot=0)["macro"]
        tune.report({"score": float(np.nan_to_num(macro[metric], nan=0.0)), metric: macro[metric],
                     "model": model_name, "loss": loss, "epoch": epoch})

    t = task.train  # the loss and weight decay `finetune` trains this head with
    loss = label_loss(task.labels, pos_weights(y[train_rows]))
    fit(model, batcher, train_rows, loss, epochs=epochs, lr=t.lr, weight_decay=t.weight_decay_grid[0],
        batch_size=t.batch_size, seed=t.seed, desc="sweep head", device=task.device, on_epoch=report)


def feature_settings(cfg: SweepConfig) -> list[dict]:
    """Every combination of the swept feature-changing values (one dict per cache entry set)."""
    keys = [k for k in cfg.space if k.startswith(FEATURE_KEYS)]
    values = [next(iter(cfg.space[k].values())) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def check_combinations(cfg: SweepConfig, limit: int = 256) -> None:
    """Every combination of the discrete (grid/choice) values makes a valid task, before Ray starts
    (e.g. partial fine-tuning or EHR fusion with plane experts is refused, naming the values)."""
    keys = [k for k, dist in cfg.space.items() if next(iter(dist)) in ("grid", "choice")]
    combos = list(itertools.islice(itertools.product(*[next(iter(cfg.space[k].values())) for k in keys]), limit))
    for combo in combos:
        try:
            trial_task(cfg.task, cfg.overrides, dict(zip(keys, combo)), cfg.select_split)
        except ConfigError as exc:
            raise ConfigError(f"sweep: space values {param_overrides(dict(zip(keys, combo)))}: {exc}") from None


def prepare_sweep(cfg: SweepConfig) -> TaskConfig:
    """All checks and the feature cache, before any trial: returns the base task."""
    check_combinations(cfg)
    for setting in feature_settings(cfg):
        task = trial_task(cfg.task, cfg.overrides, setting, cfg.select_split)
        selection_target(cfg, task)
        manifest = check_task(task)
        frame = load_studies(task)
        split_rows(frame, task)
        prepare_planes(task, list(frame["key"]), manifest, FeatureCache(task.cache_dir))
    return resolve_task(cfg.task, cfg.overrides)


def run_sweep(cfg: SweepConfig, run_dir: str | Path | None = None) -> dict:
    """Check, cache features, run (or resume) the Tune experiment, write the run folder."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    t0 = time.perf_counter()
    task = resolve_task(cfg.task, cfg.overrides)
    max_t = cfg.scheduler.rungs(task.train.epochs)
    metric, model = selection_target(cfg, task)
    out = Path(run_dir or Path(cfg.out) / (cfg.name or f"{task.name}-sweep")).resolve()
    check_resume(saved_yaml(out / "config.yaml"), to_dict(cfg), out, "sweep", ignore=RESUME_IGNORE)
    base = prepare_sweep(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    overrides = absolute_paths(base, cfg.overrides)
    t_prepared = time.perf_counter()
    s = cfg.scheduler
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor)
    space = {"task": cfg.task, "overrides": overrides, "params": param_space(cfg), "select_split": cfg.select_split,
             "metric": metric, "model": model, "report_every": s.report_every}
    tune_config = tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, num_samples=cfg.num_samples,
                                  reuse_actors=True,
                                  search_alg=BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials,
                                                                   random_state=cfg.seed))
    grid = run_tuner(sweep_trial, space, out, tune_config, cfg.resources, cfg.ray.address)
    trials = sweep_table(trial_rows(grid), metric)
    trials.to_csv(out / "trials.csv", index=False, float_format="%.5f")
    best = best_trial(trials, cfg, overrides, metric, model)
    (out / "best.json").write_text(json.dumps(best, indent=1))
    summary = {"task": cfg.task, "run_dir": str(out), "best": best, "n_trials": int(len(trials)),
               "n_errors": int(trials["error"].notna().sum()),
               "timings": {"prepare_s": round(t_prepared - t0, 3), "total_s": round(time.perf_counter() - t0, 3)}}
    write_metrics(out, summary, default=None)
    with start_tracking(cfg.wandb, out, out.name, to_dict(cfg), group=cfg.task, job_type="sweep") as tracker:
        tracker.table("trials", trials)
        tracker.summary({"best/value": best["value"], "n_trials": summary["n_trials"], "n_errors": summary["n_errors"]})
    return summary | {"trials": trials}


def sweep_table(rows: list[dict], metric: str) -> pd.DataFrame:
    records = []
    for r in rows:
        m = r["metrics"]
        records.append({"trial": Path(r["path"]).name, **{f"param:{k}": json.dumps(v) for k, v in r["config"]["params"].items()},
                        f"val_{metric}": m.get(metric, float("nan")), "epochs": m.get("epoch", 0),
                        "loss": m.get("loss", float("nan")), "error": r["error"]})
    return pd.DataFrame(records)


def best_trial(trials: pd.DataFrame, cfg: SweepConfig, overrides: list[str], metric: str, model: str) -> dict:
    """The trial with the best last-reported selection metric among those that did not fail."""
    ok = trials[trials["error"].isna() & trials[f"val_{metric}"].notna()]
    if ok.empty:
        raise RuntimeError(f"sweep: every trial failed; see {trials['error'].dropna().head(3).tolist()}")
    row = ok.loc[ok[f"val_{metric}"].idxmax()]
    params = {c.split(":", 1)[1]: json.loads(row[c]) for c in trials.columns if c.startswith("param:")}
    return {"task": cfg.task, "trial": row["trial"], "params": params, "metric": f"{cfg.select_split} {metric} of {model}",
            "value": float(row[f"val_{metric}"]), "epochs_reported": int(row["epochs"]),
            "overrides": [*overrides, *param_overrides(params)]}


def from_sweep_overrides(run: str | Path, task: str) -> list[str]:
    """The overrides that re-create a sweep's best head (``finetune --from-sweep``)."""
    path = Path(run) / "best.json"
    if not path.is_file():
        raise ConfigError(f"--from-sweep: {path} not found; is '{run}' a finished sweep run folder?")
    best = json.loads(path.read_text())
    if Path(best["task"]).stem != Path(task).stem:
        raise ConfigError(f"--from-sweep: the sweep in {run} tuned task '{best['task']}', not '{task}'")
    return list(best["overrides"])
