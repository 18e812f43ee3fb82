"""Applying a loaded task model to studies: checks, preprocessing, backbone features, head.

A :class:`Study` holds one exam's plane volumes (slices, rows, cols) and where they came from; the
:class:`Predictor` turns a batch of studies into result rows. A study that cannot be predicted
(a plane missing, another joint, intensities outside the stored window) becomes a row with
``status="failed"`` and the reason; the others are predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import Resize, ResizeWithPadOrCrop

from pretrain.preprocess import preprocess_volume

from .heads.segmentation import remap_structures
from .labels import SEP, to_probs
from .metrics import segmentation_scores
from .task_model import TaskModel


@dataclass
class Study:
    key: str
    joint: str
    volumes: dict[str, np.ndarray]                     # plane -> (slices, rows, cols)
    spacing: dict[str, list[float]] = field(default_factory=dict)
    patient: str = ""
    info: dict = field(default_factory=dict)          # site, vendor, field strength (shards)
    geometry: dict = field(default_factory=dict)      # plane -> how to write a label map back
    labels: dict | None = None                        # known labels (evaluate)
    truth: dict = field(default_factory=dict)         # plane -> label map (evaluate, segmentation)


class StudyError(ValueError):
    """This study cannot be predicted; the message is the reason listed in the output."""


class Predictor:
    """A task model on one device; ``predict(studies)`` -> one row per study, in order."""

    def __init__(self, model: TaskModel, device: str = "cpu", max_clipped: float = 0.5):
        self.model, self.device, self.max_clipped = model, device, max_clipped
        self.feat = model.task.features
        self.specs = {p: model.spec(p) for p in model.planes}
        for m in model.backbones.values():
            m.to(device).eval()
        model.head.to(device).eval()

    def check(self, study: Study) -> None:
        if study.joint != self.model.meta["joint"]:
            raise StudyError(f"joint '{study.joint}' but the model is for '{self.model.meta['joint']}'")
        missing = [p for p in self.model.planes if p not in study.volumes]
        if missing:
            raise StudyError(f"missing plane(s) {missing} (the study has {sorted(study.volumes) or 'none'}; "
                             f"the model needs {self.model.planes})")

    def prepare(self, study: Study) -> dict[str, torch.Tensor]:
        """(1, *grid) per plane; refuses a volume mostly outside the stored intensity window (if it has one)."""
        out = {}
        for plane in self.model.planes:
            spec, vol = self.specs[plane], np.asarray(study.volumes[plane], dtype=np.float32)
            if vol.ndim != 3 or not np.isfinite(vol).all():
                raise StudyError(f"plane {plane}: expected a finite (slices, rows, cols) volume, got shape {vol.shape}")
            no_window = spec.intensity in ("minmax", "volume")  # scaled by each volume's own statistics
            outside = 0.0 if no_window else float(((vol < spec.low) | (vol > spec.high)).mean())
            if outside > self.max_clipped:
                raise StudyError(f"plane {plane}: {outside:.0%} of voxels outside the model's intensity window "
                                 f"[{spec.low:.4g}, {spec.high:.4g}] (input range [{vol.min():.4g}, {vol.max():.4g}]); "
                                 f"preprocessing does not match this input")
            out[plane] = preprocess_volume(vol, spec)
        return out

    def predict(self, studies: list[Study]) -> list[dict]:
        rows, ready, inputs = [], [], []
        for study in studies:
            try:
                self.check(study)
                inputs.append(self.prepare(study))
                ready.append(study)
            except StudyError as exc:
                rows.append(self.row(study, error=str(exc)))
        if ready:
            with torch.no_grad():
                batch = {p: torch.stack([x[p] for x in inputs]).to(self.device) for p in self.model.planes}
                outputs = self.forward(batch)
            rows += [self.row(s, out) for s, out in zip(ready, outputs)]
        order = {s.key: i for i, s in enumerate(studies)}
        return sorted(rows, key=lambda r: order[r["key"]])

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        out = {}
        for plane, x in batch.items():
            feat = self.feat.for_plane(plane)
            maps = self.model.backbones[plane].features(x, list(feat.timesteps), list(feat.blocks), feat.noise_draws,
                                                        feat.seed)
            out[plane] = [t.float() for _, t in sorted(maps.items())]
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> list:
        """Per study: label probabilities (L,) or a logit map (K, *grid)."""
        head, kind = self.model.head, self.model.meta["head"]
        labels = self.model.labels
        if kind == "tuned":
            return list(to_probs(head(batch), labels).cpu().numpy())
        feats = self.features(batch)
        if kind == "segmentation":
            return list(head(feats).cpu())
        if kind == "experts":  # plane experts and their gate are one-vs-rest per output
            probs = torch.stack([torch.sigmoid(head["experts"][p](feats)) for p in self.model.planes], dim=1)
            return list(torch.sigmoid(head["gate"](probs)).cpu().numpy())
        if self.model.task.head.kind == "logistic":
            return list(torch.sigmoid(head(feats)).cpu().numpy())  # the probe: one-vs-rest per output
        return list(to_probs(head(feats), labels).cpu().numpy())

    def row(self, study: Study, output=None, error: str | None = None) -> dict:
        row = {"key": study.key, "patient": study.patient, "planes": "+".join(p for p in self.model.planes
                                                                             if p in study.volumes),
               "status": "failed" if error else "ok", "error": error or "", **study.info}
        if study.labels is not None:
            row["truth"] = {name: _truth(study.labels, self.model.labels, name) for name in self.model.labels}
        if error:
            return row
        if self.model.meta["kind"] == "diagnosis":
            row["probs"] = {name: float(p) for name, p in zip(self.model.labels, output)}
            return row
        plane = self.model.planes[0]
        seg = back_to_input(output, self.specs[plane], study.volumes[plane].shape)
        row["seg"], row["geometry"] = {plane: seg}, study.geometry
        if plane in study.truth:
            row["scores"] = self.scores(seg, study.truth[plane], study.spacing[plane])
        return row

    def scores(self, pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
        """Dice, HD95 (mm), IoU per structure on the input's own grid (unlabelled voxels left out)."""
        vocab = self.model.meta["vocabulary"]
        t = remap_structures(torch.from_numpy(truth.astype(np.int64)), vocab["source_structures"],
                             vocab["structures"], vocab["ignore_index"])
        p = torch.from_numpy(pred.astype(np.int64))
        p = torch.where(t == vocab["ignore_index"], 0, p)
        t = torch.where(t == vocab["ignore_index"], 0, t)
        s = segmentation_scores(p[None], t[None], len(vocab["structures"]) + 1, spacing)
        return {k: v[0].tolist() for k, v in s.items()}


def back_to_input(logits: torch.Tensor, spec, shape) -> np.ndarray:
    """Label map (uint8, 0 = background, k = k-th structure) on the input's (slices, rows, cols)
    grid: the logits resampled back from the model grid (inverse of the spatial preprocessing)."""
    shape = [int(s) for s in shape]
    if spec.spatial == "resize":
        back = Resize(shape, mode="trilinear", anti_aliasing=False)(logits)
    else:
        back = ResizeWithPadOrCrop(shape, mode="constant")(logits)
    return torch.as_tensor(back).argmax(dim=0).numpy().astype(np.uint8)


def _truth(labels: dict, outputs: list[str], output: str):
    """A study's true value of an output: the label's value, or 1/0 for a class output (None unknown)."""
    if SEP not in output:
        return labels.get(output)
    name = output.split(SEP, 1)[0]
    value = labels.get(name)
    group = [o for o in outputs if o.split(SEP, 1)[0] == name]
    return None if value is None else int(int(value) == group.index(output))
