"""The renderers of the results blocks: one function per block name, registered in ``SECTIONS`` (see ``core``).

Each reads its JSON under the project root (``runs/…``, ``bench/results/…``) and returns the block's Markdown.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from readme_sections.core import SECTIONS, read_json

# ------------------------------------------------------------------------------------------------ renderers


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


@SECTIONS.register("demo")
def demo_section(root: Path) -> str:
    """The demo's table, its headline comparisons, how the cached run was killed, and where the time went."""
    from mmkd.report.demo_report import markdown_table, table_rows

    m = read_json(root / "runs" / "demo" / "metrics.json", "demo", "run `make demo` (or `mmkd demo`) first")
    rows = {r["model"]: r for r in table_rows(m)}
    models, demo = m["models"], m["demo"]
    top1 = {k: v["zeroshot"]["colour_shape"]["top1"] for k, v in models.items()}
    mach = demo.get("machine", {})
    phases = ", ".join(f"{k} {v / 60:.1f}" for k, v in demo.get("phases_s", {}).items())
    out = [f"From `runs/demo/metrics.json` of one `mmkd demo` run ({demo['seconds'] / 60:.1f} minutes on "
           f"{mach.get('cpu_count', '?')} CPU cores, {mach.get('torch_threads', '?')} torch threads, bfloat16 "
           f"{'fast' if mach.get('bf16') else 'not fast'} on this CPU; minutes per phase: {phases}). "
           "Regenerate this section with `make readme`.", "", markdown_table(list(rows.values())), ""]
    if "student" in top1 and "teacher" in top1:
        s = rows["distilled student"]
        flops = "" if s.get("flops_ratio") is None else f", {s['flops_ratio']:.1f}× fewer FLOPs per image"
        line = (f"The distilled student ({s.get('from_teacher', '–')}) keeps {_pct(s['kept'])}% of the teacher's "
                f"64-class colour+shape zero-shot top-1 and is {s['speedup']:.1f}× faster per image at batch 1 "
                f"({s['speedup_b64']:.1f}× at batch 64{flops})")
        if "scratch" in top1:
            line += (f"; it beats the same-shape student trained from scratch for the same steps by "
                     f"{100 * (top1['student'] - top1['scratch']):.1f} points")
        out.append(line + ".")
    kill = models.get("student_cached", {}).get("killed_and_resumed")
    if kill and "student" in top1:
        gap = 100 * (top1["student_cached"] - top1["student"])
        where = ("level with" if round(abs(gap), 1) == 0 else
                 f"{abs(gap):.1f} points {'below' if gap < 0 else 'above'}")
        out.append(f"The student distilled from the {demo['settings']['cache_views']}-view teacher cache ends "
                   f"{where} the one whose teacher computed its targets in the run (the same views and "
                   f"weights). It ran as `mmkd distill` in a child process that was killed with "
                   f"{kill['killed_with']} as soon as its step-{kill['checkpoint_step']} checkpoint was on disk "
                   f"(its log had reached step {kill['last_logged_step_before_kill']}), and finished in a new "
                   f"process with `--resume`.")
    out.append("Speed at batch 1 is the median, over rounds, of the teacher's and the student's image encoding timed "
               "back to back, alternating which goes first, on one thread by that thread's CPU time (which other "
               "processes' load cannot stretch; the wall-clock ratio is in metrics.json); the FLOPs ratio does not "
               "depend on load.")
    return "\n".join(out)


@SECTIONS.register("demo-seeds")
def demo_seeds_section(root: Path) -> str:
    """``mmkd demo --seeds N``'s headline figures as mean ± sd over the seeds, from runs/demo-seeds/seeds.json."""
    from mmkd.report.demo_report import seeds_table

    result = read_json(root / "runs" / "demo-seeds" / "seeds.json", "demo-seeds", "run `mmkd demo --seeds 3` first")
    return (f"From `runs/demo-seeds/seeds.json` ({result['seeds']} whole demos, every run's `train.seed` offset by "
            f"0 … {result['seeds'] - 1}; sample standard deviation). Regenerate with `{result['command']}` then "
            "`make readme`.\n\n" + seeds_table(result))


@SECTIONS.register("bench-cache")
def bench_cache_section(root: Path) -> str:
    """The teacher-cache benchmark table from ``bench/results/cache_cost.json`` and ``cache_build.json``."""
    how = "run the benchmark command above with --json"
    cost = read_json(root / "bench" / "results" / "cache_cost.json", "bench-cache", how)
    build = read_json(root / "bench" / "results" / "cache_build.json", "bench-cache", how)
    d = cost["details"]

    # ratios that must stay within a few percent of 1 get three decimals, the others two
    rows = [("(c)/(a) step time, `cached_over_plain_time`", "cached_over_plain_time", 3, "≤ 1.05"),
            ("(c)/(a) memory, `cached_over_plain_memory`", "cached_over_plain_memory", 3, "≤ 1.05"),
            ("(b)/(c) time, bf16 teacher, `online_over_cached_time`", "online_over_cached_time", 2, "≥ 5 (B/16)"),
            ("(b)/(c) time, fp32 teacher, `online_fp32_over_cached_time`", "online_fp32_over_cached_time", 2, "–"),
            ("(b)/(c) memory, `online_over_cached_memory`", "online_over_cached_memory", 2, "–")]
    lines = ["| figure | B/16-shaped teacher¹ | demo teacher² | target |", "|---|---|---|---|"]
    lines += [f"| {label} | {cost[key]:.{n}f} | {cost['demo_' + key]:.{n}f} | {target} |"
              for label, key, n, target in rows]
    ens_path = root / "bench" / "results" / "cache_cost_ensemble.json"
    ens = read_json(ens_path, "bench-cache", how) if ens_path.is_file() else None
    if ens is not None:  # the two-teacher, K = 10 mode, measured in its own demo-teacher run (footnote ⁴)
        for label, key in (("(d)/(a) step time, 2 teachers' caches × K = 10", "time"), ("(d)/(a) memory", "memory")):
            full = f"cached_ensemble_k10_over_plain_{key}"
            demo = f"{ens['demo_' + full]:.3f}" if "demo_" + full in ens else "–"
            lines.append(f"| {label}, `{full}`⁴ | – | {demo} | ≤ 1.05 |")
    lines.append(f"| build / bare forward, K = 1 / K = 4 (`build_over_forward_k1`, `_k4`)³ | – | "
                 f"{build['build_over_forward_k1']:.3f} / {build['build_over_forward_k4']:.3f} | ≥ 0.9 |")

    def modes(t: str) -> tuple[dict[str, Any], str]:
        m = d[t]["modes"]
        mem = ", ".join(f"({k}) {m[mode]['above_mb']:,.0f} MB" for k, mode in (("a", "plain"), ("c", "cached"),
                                                                                 ("b", "online_bf16")))
        return m, mem

    b16, b16_mem = modes("b16")
    demo, demo_mem = modes("demo")
    bd = build["details"]
    notes = [f"¹ `python bench/cache_cost.py --json bench/results/cache_cost.json` (both teachers in one run; "
              f"batch {d['batch']}, {d['steps']} timed steps after {d['warmup']}, {d['samples']} images, "
              f"K = {d['views']}, {d['repeats']} alternating processes): median step (a) {b16['plain']['step_s']:.2f}"
              f" s, (c) {b16['cached']['step_s']:.2f} s, (b) bf16 {b16['online_bf16']['step_s']:.1f} s, fp32 "
              f"{b16['online_fp32']['step_s']:.1f} s; memory above baseline {b16_mem}. Building the B/16 cache of "
              f"the {d['samples']} images × {d['views']} views took {d['b16']['cache_build_s']:.0f} s.",
              f"² The same run: (a) {demo['plain']['step_s']:.2f} s, (c) {demo['cached']['step_s']:.2f} s, (b) bf16 "
              f"{demo['online_bf16']['step_s']:.2f} s, fp32 {demo['online_fp32']['step_s']:.2f} s; memory {demo_mem}.",
              f"³ `python bench/cache_build.py --repeats 3 --json bench/results/cache_build.json` (demo teacher, "
              f"{bd['samples']:,} images, {bd['threads']} threads): best of {len(bd['k1']['build_s'])}: "
              f"{bd['k1']['forward_items_per_s']:.0f} vs {bd['k1']['build_items_per_s']:.0f} items/s at K = 1 and "
              f"{bd['k4']['forward_items_per_s']:.0f} vs {bd['k4']['build_items_per_s']:.0f} items/s at K = 4 "
              "(bare forward vs build)."]
    if ens is not None:
        e = ens["details"]["demo"]["modes"]
        notes.append(
            "⁴ `python bench/cache_cost.py --teachers demo --json bench/results/cache_cost_ensemble.json` (the same "
            f"settings; mode (d) reads two teachers' caches of {ens['details']['samples']} images × 10 views in the "
            "DataLoader's lookup, fd_mse_cosine once per teacher; plain, cached and (d) alternate over "
            f"{ens['details']['repeats']} fresh processes): median step (a) {e['plain']['step_s']:.2f} s, (c) "
            f"{e['cached']['step_s']:.2f} s, (d) {e['cached_ensemble_k10']['step_s']:.2f} s; memory above baseline "
            f"(a) {e['plain']['above_mb']:,.0f} MB, (d) {e['cached_ensemble_k10']['above_mb']:,.0f} MB.")
    return "\n".join(lines + [""] + [textwrap.fill(n, 115) for n in notes])


def _speed(per_s: float, reference: float | None) -> str:
    return f"{per_s:.0f}" if reference is None else f"{per_s:.0f} ({per_s / reference:.2f}×)"


@SECTIONS.register("bench-loader")
def bench_loader_section(root: Path) -> str:
    """The decoder and loader tables from ``bench/results/loader_throughput.json``."""
    r = read_json(root / "bench" / "results" / "loader_throughput.json", "bench-loader",
                  "run `python bench/loader_throughput.py --json bench/results/loader_throughput.json`")
    d = r["details"]
    dec, loader, mach = d["decoders"], d["loader"], d["machine"]
    views = list(dec["views"])
    pil = {v: dec["views"][v]["pil"]["images_per_s"] for v in views}
    labels = {"pil": "PIL, plain (the reference)", "pil-draft": "PIL + `draft()` (1/2, 1/4, 1/8)",
              "simplejpeg": "simplejpeg (every n/8)", "simplejpeg-noscale": "simplejpeg, no DCT scaling",
              "turbojpeg": "PyTurboJPEG (every n/8)"}
    kinds = {"train": "training view", "eval": "eval view"}
    head = " | ".join(f"{kinds.get(v.rstrip('0123456789'), v)}, {v.lstrip('abcdefghijklmnopqrstuvwxyz')} px"
                      for v in views)
    lines = [f"| decoder | {head} | worst view vs PIL | adopted |", "|---" * (len(views) + 3) + "|"]
    for name in dec["views"][views[0]]:
        rows = [dec["views"][v][name] for v in views]
        cells = " | ".join(_speed(x["images_per_s"], None if name == "pil" else pil[v])
                           for v, x in zip(views, rows))
        ok = all(x["within_tolerance"] for x in rows)
        quality = ("–" if name == "pil" else f"{min(x['worst_psnr_db'] for x in rows):.1f} dB, mean "
                   f"\\|Δ\\| ≤ {max(x['mean_abs'] for x in rows):.2f}")
        adopted = "**mmkd's**" if name == {"pil": "pil-draft"}.get(d["mmkd_decoder"], d["mmkd_decoder"]) else (
            "reference" if name == "pil" else "within tolerance" if ok else "out of tolerance")
        lines.append(f"| {labels.get(name, name)} | {cells} | {quality} | {adopted} |")
    best = loader["best"]
    names = {"bare": "bare PIL loop, 1 process", "mmkd_w0": "mmkd loader, 0 workers",
             "mmkd_w1": "mmkd loader, 1 worker", "mmkd_w2": "mmkd loader, 2 workers"}
    lines += ["", "| 224-px training views | images/s | first batch (s) |", "|---|---|---|"]
    lines += [f"| {names.get(k, k)} | {x['images_per_s']:.0f} | {x['first_batch_s']:.2f} |" for k, x in best.items()]
    tol = dec["tolerance"]
    tj = f" PyTurboJPEG was not measured ({dec['turbojpeg_unavailable']})." if dec.get("turbojpeg_unavailable") else ""
    notes = [f"`decoder_over_pil` = {r['decoder_over_pil']:.2f} (target ≥ {r['targets']['decoder_over_pil']}), "
             f"`loader_w2_over_bare` = {r['loader_w2_over_bare']:.2f} (target ≥ {r['targets']['loader_w2_over_bare']})."
             f" From `bench/results/loader_throughput.json`: images/s, best of {dec['rounds']} alternating rounds, "
             f"decoders over the {dec['photos']} coco-mini photos in one thread (decode + crop-resize), the loader "
             f"over {loader['samples']} samples in WebDataset shards (batches of {loader['batch']}; mmkd's rows are "
             "its streaming loader as `mmkd distill` runs it: shard index, shuffle plan, workers sending uint8 "
             "batches normalised in the training process). "
             f"Tolerance: every view within {tol['worst_psnr_db']:.0f} dB PSNR of PIL's, mean "
             f"absolute difference ≤ {tol['mean_abs']:.0f} levels.{tj} Machine: {mach['cpu_count']} cores, load "
             f"average {mach['loadavg_before'][0]:.1f} before and {mach['loadavg_after'][0]:.1f} after"
             + (f"; {mach['note']}" if mach.get("note") else "") + "."]
    if min(mach["loadavg_before"][0], mach["loadavg_after"][0]) > mach["cpu_count"]:
        notes.append("The machine was oversubscribed throughout (load above its core count): the worker rows measure "
                     "contention for the cores, not how the loader scales; rerun on an idle machine for that.")
    return "\n".join(lines + [""] + [textwrap.fill(n, 115) for n in notes])


@SECTIONS.register("sweep-s1")
def sweep_s1_section(root: Path) -> str:
    """S1's comparison: the sweep's own leaderboard (``runs/s1_compare/leaderboard.json``), the command that made
    it, and each distilled group's gain over its from-scratch reference."""
    from mmkd.report.leaderboard import markdown

    how = ("run `mmkd distill configs/world_teacher.yaml train.threads=1`, then `mmkd sweep configs/s1_compare.yaml "
           "teacher=runs/world_teacher/student train.threads=1`")
    board = read_json(root / "runs" / "s1_compare" / "leaderboard.json", "sweep-s1", how)
    rows = board["rows"]
    students = [r for r in rows if r["role"] != "teacher"]
    runs = sum(int(r.get("seeds") or 1) for r in students)  # a row with N seeds is N runs (train_s: their mean)
    train_s = sum((r.get("train_s") or 0) * int(r.get("seeds") or 1) for r in students)
    out = [f"From `runs/s1_compare/leaderboard.json`, written by `{board['command']}` ({runs} runs, "
           f"{train_s / 60:.0f} minutes of student training). {board['notes']}", "", markdown(rows).strip(), ""]
    for ref in (r for r in students if r["role"] == "scratch"):
        group = [r for r in students if r.get("vs_scratch") == ref["run"] and r.get("d_top1") is not None]
        if not group or ref["zs_top1"] is None:
            continue
        best = max(group, key=lambda r: r["d_top1"])
        lo, hi = min(r["d_top1"] for r in group), best["d_top1"]
        judged = [r for r in group if r.get("beyond_noise") is not None]  # the noise rule of `--seeds` (if run)
        winners = [f"`{r['run']}`" for r in judged if r["beyond_noise"]]
        noise = (f" {len(winners)} of {len(judged)} beyond noise ({', '.join(winners) or 'none'})." if judged
                 else "")
        out.append(f"- Against `{ref['run']}` ({_pct(ref['zs_top1'])}% top-1): the {len(group)} distilled runs "
                   f"gain {100 * lo:+.1f} to {100 * hi:+.1f} points; best `{best['run']}`, "
                   f"{_pct(best['zs_top1'])}%.{noise}")
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    ranked = [r for r in students if r["zs_top1"] is not None]
    if teacher is not None and teacher["zs_top1"] is not None and ranked:
        top = max(ranked, key=lambda r: r["zs_top1"])
        gap = 100 * (top["zs_top1"] - teacher["zs_top1"])
        out.append(f"- The best student, `{top['run']}`, is {abs(gap):.1f} points of top-1 "
                   f"{'below' if gap < 0 else 'above'} the teacher ({_pct(teacher['zs_top1'])}%).")
    return "\n".join(out)


@SECTIONS.register("bench-data-scale")
def bench_data_scale_section(root: Path) -> str:
    """The streaming data plane's memory and first-batch time at 20k–400k samples (``bench/data_scale.py``)."""
    r = read_json(root / "bench" / "results" / "data_scale.json", "bench-data-scale",
                  "run `python bench/data_scale.py --json bench/results/data_scale.json`")
    st = r["settings"]
    lines = [f"`bench/data_scale.py` (synthetic shards of small JPEGs, {st['per_shard']:,} per shard; {st['steps']} "
             f"steps of batch {st['batch']} at {st['image_size']} px with {st['workers']} workers, so the whole data "
             "plane is in the measured process; each N in fresh processes; `bench/results/data_scale.json`):", "",
             "| N samples (shards) | index build (once) | first batch (index built) | steps/s "
             "| peak RSS (above baseline) |",
             "|---|---|---|---|---|"]
    for n in st["sizes"]:
        x = r[str(n)]
        lines.append(f"| {n:,} ({n // st['per_shard']}) | {x['index_build_s']:.1f} s | {x['first_batch_s']:.2f} s | "
                     f"{x['steps_per_s']:.2f} | {x['peak_rss_mb']:.0f} MB ({x['peak_above_baseline_mb']:.0f} MB) |")
    lookup = r.get("cache_lookup_rss_mb_1m")
    lines += ["", f"Peak RSS at 400,000 over 20,000 samples (`rss_400k_over_20k`): **{r['rss_400k_over_20k']:.2f}** "
              f"(target ≤ 1.15; {r['rss_delta_400k_over_20k']:.2f} above the post-import baseline); first batch at "
              f"400,000 (`first_batch_s_400k`): **{r['first_batch_s_400k']:.2f} s** (target ≤ 10 s), the index "
              f"built once beforehand in {r['index_build_s_400k']:.0f} s "
              f"({1000 * r['index_build_s_400k'] / 400_000:.2f} ms a sample: indexing reads every byte once)."
              + (f" The teacher cache's key lookup at a million keys (`cache_lookup_rss_mb_1m`, from "
                 f"`{r.get('cache_lookup_from')}`): {lookup:.1f} MB." if lookup is not None else "")]
    return "\n".join([textwrap.fill(lines[0], 115)] + lines[1:-1] + [textwrap.fill(lines[-1], 115)])


@SECTIONS.register("bench-cache-lookup")
def bench_cache_lookup_section(root: Path) -> str:
    """The teacher cache's key lookup at a million keys: format 1's dict against format 2's memory-mapped index."""
    r = read_json(root / "bench" / "results" / "cache_lookup.json", "bench-cache-lookup",
                  "run `python bench/cache_lookup.py --json bench/results/cache_lookup.json`")
    d, i = r["variants"]["dict"], r["variants"]["index"]
    return "\n".join([
        textwrap.fill(f"`bench/cache_lookup.py` ({r['keys']:,} keys in {r['segments']} segments, each variant in a "
                      f"fresh process; RSS above the process's baseline after {r['lookups']:,} random lookups in "
                      f"batches of {r['batch']}; `bench/results/cache_lookup.json`):", 115), "",
        "| figure | format 1: dict of every key | format 2: memory-mapped hash index |", "|---|---|---|",
        f"| time to open | {d['open_s']:.2f} s | {1000 * i['open_s']:.1f} ms |",
        f"| RSS of the key lookup (`cache_lookup_rss_mb_1m`: format 2's) | {d['rss_mb']:.0f} MB | {i['rss_mb']:.1f} MB "
        f"(of which {i['anon_mb']:.1f} MB the process's own heap; the rest index pages in the page cache, shared by "
        "every process that maps the index) |",
        f"| lookups/s (batches of {r['batch']}) | {d['lookups_per_s']:,.0f} | {i['lookups_per_s']:,.0f} |", "",
        f"Writing the index took {r['index_build_s']:.1f} s at build time."])


@SECTIONS.register("bench-export")
def bench_export_section(root: Path) -> str:
    """ONNX export and int8 on CPU: ms/image, size on disk and zero-shot top-1 beside PyTorch's
    (``bench/export.py``)."""
    r = read_json(root / "bench" / "results" / "export.json", "bench-export",
                  "run `python bench/export.py --json bench/results/export.json`")
    lat, size, top1, q = r["latency_ms_per_image"], r["size_mb"], r["zeroshot_top1"], r["quantization"]
    names = {"pytorch": "PyTorch (fp32)", "onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8"}
    lines = ["| model | ms/image, batch 1 | ms/image, batch 64 | size on disk (image + text) | zero-shot top-1 |",
             "|---|---|---|---|---|"]
    for k, label in names.items():
        parts = " + ".join(f"{v:.1f}" for v in size[k].values())
        lines.append(f"| {label} | {lat[k]['1']:.3f} | {lat[k]['64']:.3f} | {r['size_mb_total'][k]:.1f} MB"
                     f"{'' if k == 'pytorch' else f' ({parts})'} | {_pct(top1[k])} |")
    par = r["parity"]
    m = r["machine"]
    notes = [f"From `bench/results/export.json` (`python bench/export.py --json bench/results/export.json`): the "
             f"image encoder's ms/image, median of {r['rounds']} alternating rounds, {r['threads']} thread(s) for "
             f"torch and onnxruntime alike, on {m['cpu_count']} cores (load average {m['loadavg_before_after'][0]:.1f} "
             f"before, {m['loadavg_before_after'][1]:.1f} after); zero-shot top-1 on the world's "
             f"{r['test_images']:,} test images (64 classes). Student: {r['student']}.",
             f"int8 vs PyTorch: **{r['int8_speedup_over_pytorch_b1']:.2f}×** faster at batch 1 (target ≥ 2; "
             f"{r['int8_speedup_over_pytorch_b64']:.2f}× at batch 64; fp32 ONNX "
             f"{r['fp32_speedup_over_pytorch_b1']:.2f}× at batch 1), **{100 * r['int8_over_fp32_size']:.0f}%** of "
             f"fp32's size (target ≤ 30%), top-1 **{r['int8_minus_pytorch_top1_points']:+.2f}** points (target "
             f"within 1). Image graph: {q['image']['mode']} int8"
             + (f" on {r['calibration']}" if q["image"]["mode"] == "static" else "")
             + f"; text graph: {q['text']['mode']}. Least cosine to PyTorch's embeddings over {par['checked_on']}: "
             f"fp32 image {par['fp32']['image_cosine']:.6f}, text {par['fp32']['text_cosine']:.6f}; int8 image "
             f"{par['int8']['image_cosine']:.4f}, text {par['int8']['text_cosine']:.4f}.",
             f"int8 over ONNX fp32 alone: {lat['onnx_fp32']['1'] / lat['onnx_int8']['1']:.2f}× at batch 1, "
             f"{lat['onnx_fp32']['64'] / lat['onnx_int8']['64']:.2f}× at batch 64: at batch 1 most of the gain "
             "over PyTorch is onnxruntime's (no Python, fused kernels), not int8's. The text graph "
             f"({size['onnx_fp32']['text.onnx']:.1f} MB → {size['onnx_int8']['text.onnx']:.1f} MB) is mostly the "
             "MiniLM token-embedding table."]
    return "\n".join(lines + [""] + [textwrap.fill(n, 115) + "\n" for n in notes]).rstrip("\n")


@SECTIONS.register("bench-accumulate")
def bench_accumulate_section(root: Path) -> str:
    """Exact accumulation 8 × 32 against one batch of 256: peak RSS and step time (``bench/accumulate_memory.py``)."""
    r = read_json(root / "bench" / "results" / "accumulate_memory.json", "bench-accumulate",
                  "run `python bench/accumulate_memory.py --json bench/results/accumulate_memory.json`")
    st, a, b = r["settings"], r["best"]["accumulate"], r["best"]["batch"]
    rows = [f"| {name} | {x['micro_batches']} × {x['micro_batch']} | {x['peak_mb']:.0f} MB | "
            f"{x['above_baseline_mb']:.0f} MB | {x['step_s']:.2f} ({x['step_cpu_s']:.2f}) | {x['first_loss']:.6f} |"
            for name, x in (("one batch", b), ("`train.accumulate: 8`", a))]
    return "\n".join([
        textwrap.fill(f"`bench/accumulate_memory.py` (the demo student, `{st['student']}`; {st['objectives']} on a "
                      f"batch of {st['global_batch']}; {st['device']}, {st['precision']}, {st['threads']} threads; "
                      f"each mode in fresh processes, alternating, best of {st['repeats']} rounds; "
                      "`bench/results/accumulate_memory.json`):", 115), "",
        "| mode | micro-batches | peak RSS | above baseline | s/step (CPU s) | first loss |",
        "|---|---|---|---|---|---|",
        *rows, "",
        textwrap.fill(f"Peak RSS ratio, accumulate / batch (`peak_ratio`): **{r['peak_ratio']:.2f}** "
                      f"({r['above_baseline_ratio']:.2f} of the step's own memory above the baseline of weights, "
                      f"data and libraries); CPU time per step ratio (`step_cpu_ratio`) {r['step_cpu_ratio']:.2f}: "
                      "the extra forward per micro-batch and smaller matrix products (wall-clock ratio "
                      f"{r['step_time_ratio']:.2f}, from a machine shared with other jobs: CPU seconds are the "
                      "figure to read); the same loss (relative difference "
                      f"{r['first_loss_rel_diff']:.0e}).", 115)])


@SECTIONS.register("bench-cache-build-memory")
def bench_cache_build_memory_section(root: Path) -> str:
    """A teacher cache build's peak memory at 30k and 300k samples, and growing by one shard
    (``bench/cache_build_memory.py``)."""
    r = read_json(root / "bench" / "results" / "cache_build_memory.json", "bench-cache-build-memory",
                  "run `python bench/cache_build_memory.py --json bench/results/cache_build_memory.json`")
    st = r["settings"]
    lines = [f"`bench/cache_build_memory.py` (`mmkd cache` over synthetic shards of small JPEGs, {st['per_shard']:,} a "
             f"shard; teacher: {st['teacher']}, {st['views']} view, {st['dtype']}; each build and each growth by one "
             "shard in a fresh process that also indexes the shards; `bench/results/cache_build_memory.json`):", "",
             "| N samples (shards) | index + build | peak RSS of the build (above baseline) | grown by one shard: "
             "peak RSS |", "|---|---|---|---|"]
    for n in st["sizes"]:
        b, g = r[str(n)]["build"], r[str(n)]["grow"]
        lines.append(f"| {n:,} ({n // st['per_shard']}) | {b['index_s'] + b['build_s']:.0f} s | "
                     f"{b['peak_rss_mb']:.0f} MB ({b['peak_above_baseline_mb']:.0f} MB) | {g['peak_rss_mb']:.0f} MB |")
    lines += ["", f"Peak RSS at 300,000 over 30,000 samples (`rss_300k_over_30k`): **{r['rss_300k_over_30k']:.2f}** "
              f"(target ≤ 1.15; {r['rss_delta_300k_over_30k']:.2f} above the post-import baseline); growing the "
              f"300,000-sample cache by one shard over building it (`grow_rss_over_build_300k`): "
              f"{r['grow_rss_over_build_300k']:.2f}."]
    return "\n".join([textwrap.fill(lines[0], 115)] + lines[1:-1] + [textwrap.fill(lines[-1], 115)])


def _build_cpu(d: dict[str, Any]) -> str:
    cpu, threads = d.get("cache_build_cpu_s"), d.get("threads")
    return (f" ({cpu:.0f} CPU s)" if cpu is not None else "") + (f"; {threads} torch thread(s)" if threads else "")


def _equal_compute_spread(s: dict[str, Any]) -> str:
    """Final top-1 per mode over seeds and the paired Δs with their noise verdict (older summaries lack them)."""
    if "final_top1" not in s:
        return ""
    f, verdict = s["final_top1"], {True: "beyond noise", False: "within noise", None: "one seed: noise unknown"}

    def pm(x: dict[str, Any], sign: bool = False) -> str:
        return (f"{100 * x['mean']:+.1f}" if sign else _pct(x["mean"])) + (
            f" ± {100 * x['sd']:.1f}" if x["sd"] is not None else "")
    parts = [f"{m} {pm(f[m])}" for m in ("scratch", "online", "online_views", "cached") if m in f]
    deltas = [f"{k.replace('-', ' − ')} {pm(d, sign=True)} ({verdict[d['beyond_noise']]})"
              for k, d in s["deltas"].items()]
    return (f" Final top-1 over {next(iter(f.values()))['n']} seed(s) (mean ± sd): {', '.join(parts)}; paired by "
            f"seed: {'; '.join(deltas)} (the noise rule of `mmkd sweep --seeds`).")


@SECTIONS.register("bench-equal-compute")
def bench_equal_compute_section(root: Path) -> str:
    """The teacher cache's worth at equal compute: where the cached student reaches the online student's final
    zero-shot top-1, in training time (``bench/equal_compute.py``)."""
    r = read_json(root / "bench" / "results" / "equal_compute.json", "bench-equal-compute",
                  "run `python bench/equal_compute.py --json bench/results/equal_compute.json`")
    d, s, rows = r["details"], r["summary"], []
    for mode in ("scratch", "online", "online_views", "cached"):
        for run in r["runs"].get(mode, []):
            last = run["curve"][-1]
            rows.append(f"| {mode} | {run['seed']} | {_pct(last['top1'])} | {last['step']} | {last['samples']:,} | "
                        f"{last['time_s']:.0f} s | {last['cpu_s']:.0f} s |")
    seeds, reached = s["per_seed"], [x for x in s["per_seed"] if x["reached"]]
    hits = ", ".join(f"step {x['reached_at_step']}: {x['time_fraction']:.2f} ({x['time_fraction_with_build']:.2f} "
                     f"with the cache's build; B/16-shaped teacher {x.get('b16_time_fraction', float('nan')):.3f})"
                     for x in reached)
    teacher = (f"the demo teacher trained {d['teacher_steps']} steps" if d.get("teacher_steps")
               else f"the teacher {d['teacher']}") + f", top-1 {_pct(d['teacher_top1'])} on the same images"

    lines = [textwrap.fill(f"`bench/equal_compute.py` ({teacher}; students of `configs/demo/` for {d['steps']} steps, "
                           f"seed(s) {', '.join(map(str, d['seeds']))}; colour+shape zero-shot top-1 on "
                           f"{d['val_images']:,} validation images every {d['eval_every']} steps, evaluation left out "
                           f"of the training clock; cache of {d['views']} views per image built in "
                           f"{d['cache_build_s']:.0f} s{_build_cpu(d)}; `bench/results/equal_compute.json`, figure "
                           "`bench/results/equal_compute.png`):", 115), "",
             "| student | seed | final top-1 (val) | steps | images seen | training wall-clock | CPU s |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    if len(reached) == len(seeds):
        text = (f"The cached student reaches the online student's final top-1 at step "
                f"{', '.join(str(x['reached_at_step']) for x in seeds)}: **{s['time_fraction']:.2f}** of the online "
                f"student's training wall-clock (goal ≤ 0.33; CPU seconds {s['cpu_fraction']:.2f}; with the cache's "
                f"build counted {s['time_fraction_with_build']:.2f}). With a ViT-B/16-shaped teacher, whose online "
                f"step costs {d['b16_online_over_cached_time']:.2f}× the cached one (`{d['b16_source']}`), the same "
                f"steps take **{s['b16_time_fraction']:.3f}** of the online student's time.")
    else:
        text = (f"The cached student does not reach the online student's final top-1 in {len(seeds) - len(reached)} "
                f"of {len(seeds)} seed(s) (final top-1, online vs cached: "
                + "; ".join(f"{_pct(x['online_final_top1'])} vs {_pct(x['cached_final_top1'])}" for x in seeds)
                + "; training seconds " + ", ".join(f"{x['online_s']:.0f} vs {x['cached_s']:.0f}" for x in seeds)
                + ")" + (f"; the other(s) reach it at {hits} of the online student's wall-clock" if reached else "")
                + ".")
    text += _equal_compute_spread(s) + (
        f" At equal steps the cached student trains in {s['equal_steps_time_fraction']:.2f} of the online student's "
        f"wall-clock ({s['equal_steps_cpu_fraction']:.2f} of its CPU seconds) with this teacher; with the B/16-shaped "
        f"one, 1/{d['b16_online_over_cached_time']:.2f} = {1 / d['b16_online_over_cached_time']:.2f}.")
    return "\n".join(lines + [textwrap.fill(text, 115, break_on_hyphens=False), "",  # "wall-clock" stays whole
                              "![equal compute](bench/results/equal_compute.png)"])
