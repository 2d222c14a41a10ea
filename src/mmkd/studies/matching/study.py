"""One matching study on a pairs file: teacher (fine-tuned once, then reused), baseline and KD students.

Everything expensive happens once per study: the teacher is fine-tuned and saved with its logits for every
pair (``OUT/teacher``, reused while the pairs, teacher source and teacher settings are unchanged), and the
student's sentence features are computed once per distinct caption. A student run then costs only its own
training, which is what makes a 24-point sweep affordable.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from mmkd.config_io import to_dict
from mmkd.devices import resolve_device
from mmkd.fileio import atomic_write_bytes, atomic_write_json
from mmkd.studies.matching.config import MatchingConfig
from mmkd.studies.matching.data import PairData
from mmkd.studies.matching.losses import KDConfig
from mmkd.studies.matching.metrics import binary_metrics, choose_threshold
from mmkd.studies.matching.models import TeacherMatcher, load_teacher_matcher, save_teacher_matcher
from mmkd.studies.matching.pairs import SPLITS
from mmkd.studies.matching.train import (
    Log,
    StudentTrainConfig,
    TeacherInputs,
    TeacherTrainConfig,
    TransferSet,
    as_numpy,
    build_transfer_set,
    fit_teacher,
    freeze,
    student_logits,
    teacher_logits,
    train_student,
)


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_settings(cfg: MatchingConfig) -> dict[str, Any]:
    """How the teacher is fine-tuned (not where it comes from): what its reuse depends on besides the source."""
    return {f.name: getattr(cfg.teacher, f.name) for f in fields(TeacherTrainConfig)}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write_bytes(path, save({k: v.cpu().contiguous() for k, v in tensors.items()}))


def evaluate(data: PairData, logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Threshold chosen on val (best accuracy), applied to val and test."""
    th = choose_threshold(as_numpy(logits["val"]), data.splits["val"].labels.numpy())
    return {s: binary_metrics(as_numpy(logits[s]), data.splits[s].labels.numpy(), th) for s in ("val", "test")}


class MatchingStudy:
    def __init__(self, data: PairData, teacher_source: str | Path, out: str | Path, cfg: MatchingConfig | None = None,
                 text_cache: str | Path | None = None, log: Log = print, text_encoder: Any = None) -> None:
        self.data, self.cfg, self.log = data, cfg or MatchingConfig(), log
        self.teacher_source = Path(teacher_source)
        self.out = Path(out)
        self.text_cache = text_cache
        self._encoder = text_encoder  # a TextEncoder to share (its memo) with a pair builder; made lazily if None
        self.teacher: TeacherMatcher | None = None
        self.logits: dict[str, torch.Tensor] = {}
        self.teacher_info: dict[str, Any] = {}
        self._text_feats: torch.Tensor | None = None
        self._inputs: TeacherInputs | None = None
        self._transfer: TransferSet | None = None
        self._teacher_dir: Path | None = None  # the folder this study manages (caches go there), if any
        self.device = resolve_device(self.cfg.device, "device")  # the teacher and the students run there

    # -------------------------------------------------------------------------------------------- teacher
    def _fingerprint(self) -> str:
        """Pairs content, teacher folder (path and weight files' size and time) and teacher settings."""
        src = self.teacher_source.resolve()
        weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.glob("*.safetensors")) \
            if src.is_dir() else []
        blob = json.dumps({"pairs": _sha1_file(self.data.pairset.path), "teacher": str(src), "weights": weights,
                           "config": teacher_settings(self.cfg)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def prepare_teacher(self) -> TeacherMatcher:
        """Fine-tune (or reuse) the teacher and cache its logits for every pair; it is frozen from then on."""
        if self.teacher is not None:
            return self.teacher
        folder = self.out / "teacher"
        if (self.teacher_source / "matching.json").is_file():  # an already fine-tuned matcher: use it as is
            self.log(f"teacher: using the matching teacher {self.teacher_source} as is (no fine-tuning)")
            teacher, info = load_teacher_matcher(self.teacher_source)
            teacher.to(self.device)
            inputs = TeacherInputs(teacher, self.data, "all")
            self.logits = {s: teacher_logits(teacher, inputs, self.data.splits[s]) for s in SPLITS}
            self._inputs = inputs
            self.teacher, self.teacher_info = teacher, {**info, "fine_tuned_here": False, "seconds": 0.0}
            return teacher
        fp = self._fingerprint()
        info_file, logit_file = folder / "matching.json", folder / "logits.safetensors"
        if info_file.is_file() and logit_file.is_file():
            info = json.loads(info_file.read_text())
            if info.get("fingerprint") == fp:
                self.log(f"teacher: reusing the fine-tuned matcher {folder}")
                self.teacher, self.teacher_info = load_teacher_matcher(folder)
                self.teacher.to(self.device)
                self._teacher_dir = folder
                freeze(self.teacher)
                cached = load_file(str(logit_file))
                self.logits = {s: cached[s] for s in SPLITS}
                return self.teacher
        from mmkd.models.hub import load_dual_encoder

        tcfg = self.cfg.teacher
        self.log(f"teacher: fine-tuning {self.teacher_source} with a {tcfg.head} head (BCE, Adam lr {tcfg.lr}, "
                 f"{tcfg.epochs} epochs, trainable: {tcfg.trainable})")
        teacher = TeacherMatcher(load_dual_encoder(self.teacher_source), tcfg.head).to(self.device)
        result, inputs = fit_teacher(teacher, self.data, tcfg, self.log)
        self.logits = {s: teacher_logits(teacher, inputs, self.data.splits[s]) for s in SPLITS}
        info = {"fingerprint": fp, "source": str(self.teacher_source), "seconds": round(result["seconds"], 1),
                "history": result["history"], "config": result["config"], "fine_tuned_here": True}
        save_teacher_matcher(teacher, folder, info)
        _save_tensors(self.logits, logit_file)
        self.teacher, self.teacher_info = teacher, {"head": tcfg.head, **info}
        self._inputs, self._teacher_dir = inputs, folder
        return teacher

    def transfer_set(self) -> TransferSet:
        """The teacher's logits for every training image × training caption, computed once and cached."""
        if self._transfer is not None:
            return self._transfer
        teacher = self.prepare_teacher()
        file = self._teacher_dir / "transfer.safetensors" if self._teacher_dir else None
        if file is not None and file.is_file():
            t = load_file(str(file))
            self._transfer = TransferSet(t["images"], t["captions"], t["logits"])
            return self._transfer
        inputs = self._inputs or TeacherInputs(teacher, self.data, self.cfg.teacher.trainable)
        self._inputs = inputs
        train = self.data.splits["train"]
        self.log(f"teacher transfer set: {len(torch.unique(train.image_idx))} training images × "
                 f"{len(torch.unique(train.caption_idx))} training captions, scored once")
        self._transfer = build_transfer_set(teacher, inputs, train)
        if file is not None:
            tr = self._transfer
            _save_tensors({"images": tr.images, "captions": tr.captions, "logits": tr.logits}, file)
        return self._transfer

    # -------------------------------------------------------------------------------------------- student
    def text_features(self) -> torch.Tensor:
        if self._text_feats is None:
            from mmkd.studies.matching.text import TextEncoder

            enc = self._encoder or TextEncoder(self.cfg.text_encoder, cache_file=self.text_cache)
            self.log(f"student text features: {len(self.data.captions)} captions through {enc.path} "
                     "(frozen, once)")
            self._text_feats = torch.from_numpy(enc(self.data.captions))
            enc.save_cache()
        return self._text_feats

    def run_student(self, kd: KDConfig | None, name: str | None = None,
                    train: StudentTrainConfig | None = None) -> dict[str, Any]:
        """Train one student (baseline when ``kd`` is None) and evaluate it; the teacher only as cached logits.

        ``train`` replaces the config's ``train`` section for this student (another seed or transfer size).
        """
        name = name or (kd.name if kd else "baseline")
        tc = train or self.cfg.train
        if kd is not None:
            self.prepare_teacher()
        feats = self.text_features()
        transfer = self.transfer_set() if kd is not None and tc.transfer > 0 else None
        what = (f"KD-{kd.variant} (T={kd.temperature}, α={kd.alpha}"
                + (f", +{tc.transfer} teacher-labelled pairs per pair)" if transfer else ")")
                if kd else "baseline (BCE)")
        self.log(f"{name}: {what}, {tc.epochs} epochs, lr {tc.lr}, seed {tc.seed}")
        run = train_student(self.data, feats, self.cfg.student, tc, kd,
                            self.logits.get("train") if kd else None, log=self.log, name=name, transfer=transfer,
                            device=self.device)
        images = self.data.images(self.cfg.student.image_size, self.cfg.student.image_mean, self.cfg.student.image_std)
        logits = {s: student_logits(run.model, images, feats, self.data.splits[s]) for s in ("val", "test")}
        result = {**evaluate(self.data, logits), "train_seconds": round(run.seconds, 1), "history": run.history,
                  "params": sum(p.numel() for p in run.model.parameters())}
        if kd is not None:
            result["kd"] = asdict(kd)
        return result

    def teacher_result(self) -> dict[str, Any]:
        teacher = self.prepare_teacher()
        return {**evaluate(self.data, self.logits), "train_seconds": self.teacher_info.get("seconds", 0.0),
                "params": sum(p.numel() for p in teacher.parameters())}

    def teacher_errors(self, split: str = "test", limit: int | None = None) -> list[dict[str, Any]]:
        """The teacher's wrong decisions (at the val threshold) with their captions, worst first."""
        self.prepare_teacher()
        th = evaluate(self.data, self.logits)["test"]["threshold"]
        sp = self.data.splits[split]
        own = {r.key: r.captions for r in self.data.records}
        rows = []
        for p, z in zip(sp.pairs, self.logits[split].tolist()):
            pred = int(z >= th)
            if pred != p.label:
                rows.append({"image_key": p.image_key, "image": p.image, "caption": p.caption, "label": p.label,
                             "predicted": pred, "logit": round(z, 4), "negative": p.negative,
                             "image_caption": p.replaced or (own[p.image_key][0] if own[p.image_key] else None),
                             "margin": round(abs(z - th), 4)})
        rows.sort(key=lambda r: -r["margin"])
        return rows[:limit] if limit else rows

    # -------------------------------------------------------------------------------------------- all
    def run(self, students: bool = True) -> dict[str, Any]:
        """Teacher, baseline and every configured KD student; writes OUT/metrics.json and OUT/report.md."""
        t0 = time.perf_counter()
        models: dict[str, Any] = {"teacher": self.teacher_result()}
        if students:
            models["baseline"] = self.run_student(None)
            for kd in self.cfg.kd:
                models[kd.name] = self.run_student(kd)
        meta = self.data.pairset.meta
        metrics = {"pairs": str(self.data.pairset.path), "data": meta.get("data"),
                   "negatives": (meta.get("build") or {}).get("negatives"), "teacher_source": str(self.teacher_source),
                   "models": models, "teacher_errors": self.teacher_errors(),
                   "config": to_dict(self.cfg), "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(self.out / "metrics.json", metrics)
        from mmkd.studies.matching.report import write_study_report

        write_study_report(self.out, metrics)
        return metrics
