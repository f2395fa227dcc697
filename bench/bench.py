"""`make bench`: the plain recipe loop against the project's trainer, side by side, against the
bare training step (the ceiling), plus the pipeline's own costs (dvc repro, no-op dvc repro,
Prefect overhead).

On the same data (the demo workspace's generated dataset unless --workspace names another),
the same model and starting weights, the same epochs, crops and optimiser settings (the
recipe's: params.yaml's train.finetune, batch 128), runs named:

plain            the book's loop: PIL decode + transforms every epoch, fp32, contiguous tensors,
                 DataLoader(shuffle, num_workers=4), plain SGD at the recipe's rates;
trainer          finetune's own `fit` with params.yaml defaults (decode cache, bf16 autocast where
                 the CPU/GPU has it, channels_last, augment_on, DataLoader workers auto), a cold
                 decode cache included;
trainer-compile  the same with compile: true (its compile time inside its first epoch);
trainer-freeze   the same with strategy freeze (cached features): head-only epochs;
ceiling          the bare training step (same model, precision, layout, optimiser, batch) on one
                 batch already on the device: what the trainer would reach with a free loader.

Prints a table, writes reports/bench-<device>.json (--out) and the table of docs/speed.md
between its bench markers (CPU runs). Numbers are measured here, on this machine; nothing is
asserted.

With the pipeline, the serving row follows (bench/serve_bench.py): `python -m finetune serve` of
the workspace's production, 2,000 requests at concurrency 16 (--serving-requests,
--serving-concurrency; 0 requests: no row): req/s, p50/p95/p99 and the server's RSS before and
after. --serving-only measures that row alone (in --workspace, whose production it serves, or
--serving-model) and adds it to the existing report and table.

--no-pipeline runs the training part alone, where torch, torchvision, numpy, Pillow, pandas,
PyYAML and tqdm are installed and pydantic, MLflow, DVC and Prefect need not be: settings are
read from params.yaml as plain YAML, and without --workspace a hot-dog-sized set is generated
(--train-images, --test-images; weights none). --scale N generates an N-image set and reports
the decode cache's build rate (images/s per core), resident memory while training on 10,000
and on N images, and train images/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from itertools import zip_longest
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader

# Only the trainer is imported here: --no-pipeline must run without pydantic, MLflow, DVC and
# Prefect, so the pipeline's modules are imported inside the functions that use them.
from finetune.data.images import load_splits
from finetune.data.portable import eval_transform
from finetune.model.factory import build_model, head_of, weights_path
from finetune.train.augment import train_transform
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.recipe import replaced
from finetune.train.runtime import autocast, pick_device, predict, resolve_runtime, seed_everything
from finetune.train.strategy import make_optimizer

REPO = Path(__file__).resolve().parents[1]
# The book's num_workers=4 on a machine with fewer cores: what the plain loop is, said once here.
warnings.filterwarnings("ignore", message="This DataLoader will create")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SPEED_PAGE = REPO / "docs" / "speed.md"
RUNS = ("plain", "trainer", "trainer-compile", "trainer-freeze", "ceiling")
SCALE_FIRST = 10_000  # --scale reports memory at this many images and at N
# The bench times training on data sized for timing (a few epochs, often tiny): it reports each
# run's accuracy, and neither fails a run that did not learn nor warns about its step count.
SPEED_ONLY = {"judge_epochs": False, "min_steps": 0}


def settings(ws: Path, epochs: int, crop: int, resize: int, device: str, strategy: str = "full",
             cache: Path | None = None, batch_size: int | None = None):
    """The workspace's data and weights; the project's own train.finetune defaults (the recipe:
    batch 128, its learning rates), not the demo's laptop-sized ones; the bench's image sizes,
    epochs and device. Validated by finetune.core.config (pydantic)."""
    from finetune.core.config import load_params

    params = load_params(ws / "params.yaml")
    model = params.model.model_copy(update={"train_crop": crop, "test_resize": resize, "test_crop": crop})
    defaults = load_params(REPO / "params.yaml").train["finetune"]
    cfg = defaults.model_copy(update={"epochs": epochs, "device": device, "strategy": strategy,
                                      "batch_size": batch_size or defaults.batch_size} | SPEED_ONLY)
    update = {"model": model, "train": {**params.train, "finetune": cfg}}
    if cache is not None:
        update["cache"] = params.cache.model_copy(update={"dir": cache})
    return params.model_copy(update=update)


def plain_settings(ws: Path, epochs: int, crop: int, resize: int, device: str, strategy: str = "full",
                   cache: Path | None = None, batch_size: int | None = None) -> SimpleNamespace:
    """What :func:`settings` gives, read as plain YAML (--no-pipeline: no pydantic): the
    workspace's params.yaml if it has one, else the project's with weights none."""
    import yaml

    own = ws / "params.yaml"
    raw = yaml.safe_load((own if own.exists() else REPO / "params.yaml").read_text())
    recipe = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["finetune"]
    stopping = recipe["early_stopping"]
    cfg = recipe | {"epochs": epochs, "device": device, "strategy": strategy,
                    "batch_size": batch_size or recipe["batch_size"],
                    "early_stopping": SimpleNamespace(**stopping) if stopping else None} | SPEED_ONLY
    model = raw["model"] | {"train_crop": crop, "test_resize": resize, "test_crop": crop}
    if not own.exists():
        model["weights"] = "none"
    cache_cfg = raw["cache"] | {"dir": Path(cache if cache is not None else raw["cache"]["dir"])}
    return SimpleNamespace(model=SimpleNamespace(**model), cache=SimpleNamespace(**cache_cfg),
                           data=SimpleNamespace(dir=Path(raw["data"]["dir"])),
                           validate_=SimpleNamespace(files=Path(raw["validate"]["files"])),
                           train={"finetune": SimpleNamespace(**cfg)})


def changed(section, **changes):
    """A settings section with ``changes``: a validated copy (pydantic) or a new namespace."""
    return replaced(section, **changes)


def plain_recipe(params, ws: Path) -> dict:
    """The book's loop, written out as the book writes it."""
    cfg, m = params.train["finetune"], params.model
    seed_everything(cfg.seed, False)
    device = pick_device(cfg.device)
    started = time.perf_counter()
    train_ds, test_ds, classes = load_splits(ws / params.data.dir, ws / params.validate_.files,
                                             train_transform(m.train_crop),
                                             eval_transform(m.test_resize, m.test_crop, m.resize_mode))
    train_iter = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=4)
    test_iter = DataLoader(test_ds, batch_size=cfg.batch_size, num_workers=4)
    net = build_model(m.arch, weights_path(params.model.weights, ws), len(classes)).to(device)
    output = head_of(net)  # the new output layer, wherever model.arch keeps it
    head = {id(p) for p in output.parameters()}
    body = [p for p in net.parameters() if id(p) not in head]
    trainer = torch.optim.SGD([{"params": body}, {"params": output.parameters(), "lr": cfg.lr * cfg.head_lr_mult}],
                              lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = nn.CrossEntropyLoss(reduction=cfg.loss)
    train_s, seen = 0.0, 0
    for _ in range(cfg.epochs):
        net.train()
        tick = time.perf_counter()
        for features, labels in train_iter:
            features, labels = features.to(device), labels.to(device)
            trainer.zero_grad()
            loss(net(features), labels).backward()
            trainer.step()
            seen += len(labels)
        _sync(device)
        train_s += time.perf_counter() - tick
        accuracy, eval_rate = _plain_eval(net, test_iter, device)
    return _result("plain", seen, train_s, cfg.epochs, eval_rate, accuracy, time.perf_counter() - started)


def _plain_eval(net, test_iter, device) -> tuple[float, float]:
    net.eval()
    tick, right, total = time.perf_counter(), 0, 0
    with torch.no_grad():
        for features, labels in test_iter:
            right += (net(features.to(device)).argmax(1).cpu() == labels).sum().item()
            total += len(labels)
    _sync(device)
    return right / total, total / (time.perf_counter() - tick)


def project_trainer(params, ws: Path, name: str, **changes) -> dict:
    """finetune's trainer with its defaults (and ``changes``), timed from a cold decode cache."""
    # The plain loop trains on every train image and watches nothing: so does the trainer here.
    cfg = changed(params.train["finetune"], val_fraction=0, select="last", early_stopping=None, **changes)
    m = params.model
    seed_everything(cfg.seed, cfg.deterministic)
    runtime = resolve_runtime(cfg)
    started = time.perf_counter()
    data = loaders(params, cfg, ws / params.data.dir, ws / params.validate_.files, runtime.device.type == "cuda", ws,
                   test=True)
    test_loader = data.test
    cache_s = time.perf_counter() - started
    model = build_model(m.arch, weights_path(m.weights, ws), len(data.classes))
    with tempfile.TemporaryDirectory() as out:
        history = fit(model, data, cfg, runtime, Path(out), fingerprint="bench").history
    predict(model, test_loader, runtime)  # steady state: the loader's persistent workers started
    tick = time.perf_counter()
    probs, truth = predict(model, test_loader, runtime)
    _sync(runtime.device)
    eval_rate = len(truth) / (time.perf_counter() - tick)
    seen = sum(s.images_per_s * s.seconds for s in history)
    result = _result(name, seen, sum(s.seconds for s in history), len(history), eval_rate,
                     (probs.argmax(1) == truth).float().mean().item(), time.perf_counter() - started)
    result |= {"precision": runtime.precision, "channels_last": runtime.channels_last, "augment_on": cfg.augment_on,
               "decode_cache_s": round(cache_s, 2), "features_s": round(sum(s.features_seconds for s in history), 2),
               "first_epoch_s": round(history[0].seconds, 2), "steady_img_s": steady_rate(history)}
    return result


def steady_rate(history) -> float | None:
    """Train images/s of the epochs after the first (None with one epoch). The first pays the
    process's warm-up (oneDNN or CUDA kernels chosen, memory pools grown, loader workers started),
    which the ceiling leaves out of its timing as well (two untimed steps)."""
    later = [s for s in history[1:] if s.seconds > 0]
    if not later:
        return None
    return round(sum(s.images_per_s * s.seconds for s in later) / sum(s.seconds for s in later), 1)


def ceiling(params, steps: int) -> dict:
    """The bare training step: the trainer's model, precision, layout, optimiser and batch on one
    batch already on the device, ``steps`` steps timed after two warm-up steps."""
    cfg, m = params.train["finetune"], params.model
    seed_everything(cfg.seed, False)
    runtime = resolve_runtime(cfg)
    model = build_model(m.arch, "none", 2).to(runtime.device)
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model.to(memory_format=layout).train()
    optimizer = make_optimizer(model, cfg)
    images = torch.randn(cfg.batch_size, 3, m.train_crop, m.train_crop, device=runtime.device)
    images = images.contiguous(memory_format=layout)
    labels = torch.randint(0, 2, (cfg.batch_size,), device=runtime.device)
    loss_fn = nn.CrossEntropyLoss(reduction=cfg.loss)

    def step() -> None:
        with autocast(runtime):
            loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    for _ in range(2):
        step()
    _sync(runtime.device)
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(runtime.device)
    train_s = time.perf_counter() - tick
    result = _result("ceiling", steps * cfg.batch_size, train_s, 1, None, None, time.perf_counter() - started)
    return result | {"precision": runtime.precision, "channels_last": runtime.channels_last, "steps": steps}


def _result(name, seen, train_s, epochs, eval_rate, accuracy, wall) -> dict:
    return {"name": name, "train_img_s": round(seen / train_s, 1), "train_s": round(train_s, 2),
            "epoch_s": round(train_s / epochs, 4), "eval_img_s": None if eval_rate is None else round(eval_rate, 1),
            "test_acc": None if accuracy is None else round(accuracy, 4), "wall_s": round(wall, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(command: list[str], cwd: Path) -> float:
    """Wall seconds of ``command`` in ``cwd``; its failure stops the bench with its output."""
    from finetune.demo.workspace import stage_env

    tick = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=stage_env())
    if result.returncode != 0:
        sys.exit(f"bench: {' '.join(command)} failed in {cwd}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - tick


def pipeline_timings(ws: Path) -> dict:
    """`dvc repro --force` wall time, no-op `dvc repro` (median of 3), and Prefect's overhead: the
    flow on the up-to-date workspace minus the same work by hand (no-op repro + promote)."""
    python = sys.executable
    full = timed([python, "-m", "dvc", "repro", "--force"], ws)
    noop = statistics.median(timed([python, "-m", "dvc", "repro"], ws) for _ in range(3))
    by_hand = noop + timed([python, "-m", "finetune", "promote"], ws)
    flow = timed([python, "-m", "flows.pipeline", "--workspace", str(ws)], REPO)
    return {"dvc_repro_s": round(full, 1), "noop_dvc_repro_s": round(noop, 2), "flow_s": round(flow, 1),
            "by_hand_s": round(by_hand, 1), "prefect_overhead_s": round(flow - by_hand, 1),
            "train_stage": {variant: stage_overhead(ws, variant) for variant in ("finetune", "scratch")}}


def stage_overhead(ws: Path, variant: str, repeats: int = 3) -> dict:
    """``repeats`` runs of ``dvc repro --force --single-item train@<variant>``: the median run's wall
    time, its epochs' time (the training passes the stage's per-epoch CSV records) and the
    difference, the overhead (start-up: imports, MLflow; validation passes and checkpoints; the
    model's logging; DVC's own work), and every run's overhead (it moves by about a second)."""
    runs = []
    for _ in range(repeats):
        wall = timed([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", f"train@{variant}"], ws)
        with open(ws / "plots" / "train" / f"{variant}.csv", newline="") as f:
            epochs = sum(float(row["seconds"]) for row in csv.DictReader(f))
        runs.append((wall - epochs, wall, epochs))
    overhead, wall, epochs = sorted(runs)[len(runs) // 2]
    return {"wall_s": round(wall, 1), "epochs_s": round(epochs, 1), "overhead_s": round(overhead, 1),
            "overhead_runs_s": [round(run[0], 1) for run in runs]}


def demo_workspace() -> Path:
    """The demo's workspace folder (params.yaml's demo.workspace)."""
    from finetune.core.config import load_params

    return REPO / load_params(REPO / "params.yaml").demo.workspace


def ensure_workspace(ws: Path) -> None:
    """The demo workspace with its data validated and its source model trained (make demo's first half)."""
    if ws == demo_workspace():
        timed([sys.executable, "-m", "finetune", "demo-setup"], REPO)
    timed([sys.executable, "-m", "dvc", "repro", "validate", "pretrain"], ws)


def _render_chunk(job: tuple[Path, int, int, int, int, int]) -> Path:
    """One generated archive (finetune/demo/sample.py's images), in a worker process."""
    from finetune.demo.sample import class_names, write_sample_archive

    out, train, test, seed, min_side, max_side = job
    write_sample_archive(out, classes=class_names(2), train_per_class=train, test_per_class=test, seed=seed,
                         min_side=min_side, max_side=max_side)
    return out


def generate_set(ws: Path, train: int, test: int, min_side: int = 128, max_side: int = 512) -> Path:
    """A workspace folder with ``train`` + ``test`` generated hot-dog-like JPEGs (two classes,
    sides drawn from [min_side, max_side]) in data/hotdog and their list in
    data/validate/files.csv (train rows first, in order: a prefix is a smaller set). Returns the list."""
    chunks = max(1, min(os.cpu_count() or 1, math.ceil((train + test) / 500)))
    per = [(math.ceil(train / 2 / chunks), math.ceil(test / 2 / chunks))] * chunks
    jobs = [(ws / f".chunk-{i}.zip", tr, te, i, min_side, max_side) for i, (tr, te) in enumerate(per)]
    rows = {"train": [], "test": []}
    with ProcessPoolExecutor(chunks) as pool:
        for i, archive in enumerate(pool.map(_render_chunk, jobs)):
            with zipfile.ZipFile(archive) as zf:
                for entry in zf.namelist():
                    _, split, name, file = entry.split("/")
                    path = Path(split) / name / f"{i:03d}-{file}"
                    (ws / "data" / "hotdog" / path).parent.mkdir(parents=True, exist_ok=True)
                    (ws / "data" / "hotdog" / path).write_bytes(zf.read(entry))
                    rows[split].append(f"{path.as_posix()},{split},{name}")
            archive.unlink()
    listing = ws / "data" / "validate" / "files.csv"
    listing.parent.mkdir(parents=True, exist_ok=True)
    kept = _interleaved(rows["train"])[:train] + _interleaved(rows["test"])[:test]
    listing.write_text("path,split,class\n" + "\n".join(kept) + "\n")
    return listing


def _interleaved(rows: list[str]) -> list[str]:
    """``rows`` alternating between the classes, so that any prefix holds them in balance."""
    by_class: dict[str, list[str]] = {}
    for row in sorted(rows):
        by_class.setdefault(row.rsplit(",", 1)[1], []).append(row)
    return [row for group in zip_longest(*by_class.values()) for row in group if row is not None]


def resident_mb() -> tuple[float, float]:
    """(RSS, anonymous RSS) in MB of this process and its children (loader workers), Linux only."""
    def status(pid: str) -> dict[str, float]:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return {}
        return {k: float(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in text.splitlines())
                if k in ("VmRSS", "RssAnon")}

    me = str(os.getpid())
    pids = [me] + [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p.name) == me]
    found = [status(pid) for pid in pids]
    return sum(s.get("VmRSS", 0) for s in found), sum(s.get("RssAnon", 0) for s in found)


def _parent(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


class PeakMemory:
    """The peak of :func:`resident_mb` while the ``with`` block runs (sampled every 0.25 s)."""

    def __init__(self) -> None:
        self.rss = self.anon = 0.0
        self._done = threading.Event()

    def _sample(self) -> None:
        while True:
            rss, anon = resident_mb()
            self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
            if self._done.wait(0.25):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def scale_point(ws: Path, listing: Path, images: int, args: argparse.Namespace, cache: Path) -> dict:
    """The first ``images`` train images of ``listing``: decode-cache build time and rate, then
    ``args.scale_steps`` training steps with their peak resident memory and images/s."""
    files = ws / "data" / "validate" / f"files-{images}.csv"
    lines = listing.read_text().splitlines()
    train_rows = [r for r in lines[1:] if r.split(",")[1] == "train"][:images]
    files.write_text("\n".join([lines[0], *train_rows, *[r for r in lines[1:] if r.split(",")[1] == "test"]]) + "\n")
    params = plain_settings(ws, 1, args.crop, args.resize, args.device, cache=cache, batch_size=args.batch_size)
    cfg = changed(params.train["finetune"], val_fraction=0, select="last", early_stopping=None,
                  max_steps=args.scale_steps)
    runtime = resolve_runtime(cfg)
    tick = time.perf_counter()
    data = loaders(params, cfg, ws / params.data.dir, files, runtime.device.type == "cuda", ws)
    build_s = time.perf_counter() - tick
    cores = os.cpu_count() or 1
    model = build_model(params.model.arch, "none", len(data.classes))
    with PeakMemory() as memory, tempfile.TemporaryDirectory() as out:
        history = fit(model, data, cfg, runtime, Path(out), fingerprint="bench-scale").history
    return {"images": images, "cache_build_s": round(build_s, 1),
            "cache_img_s_per_core": round(images / build_s / cores, 1),
            "train_img_s": round(history[0].images_per_s, 1),
            "peak_rss_mb": round(memory.rss), "peak_anon_rss_mb": round(memory.anon)}


def scale_check(args: argparse.Namespace) -> dict:
    """--scale N: an N-image set; the decode cache's build rate, resident memory while training
    on min(10,000, N) and on N images, and train images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        tick = time.perf_counter()
        listing = generate_set(ws, args.scale, max(8, args.scale // 100))
        generate_s = time.perf_counter() - tick
        points = sorted({min(SCALE_FIRST, args.scale), args.scale})
        results = [scale_point(ws, listing, n, args, ws / "cache") for n in points]
    return {"images": args.scale, "generate_s": round(generate_s, 1), "steps": args.scale_steps,
            "cores": os.cpu_count(), "points": results}


def machine(device: torch.device) -> str:
    """One line naming the machine the numbers came from: CPU model and cores (and the GPU)."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    host = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
        return f"{gpu} with {host}, torch {torch.__version__}"
    return f"{host}, torch {torch.__version__}"


def ratios(report: dict) -> dict:
    """trainer / ceiling and trainer / plain (and the compiled trainer's), where both ran."""
    runs = {run["name"]: run for run in report["runs"]}
    out = {}
    for name in ("trainer", "trainer-compile"):
        for base in ("ceiling", "plain"):
            if name in runs and base in runs:
                out[f"{name}/{base}"] = round(runs[name]["train_img_s"] / runs[base]["train_img_s"], 3)
        if name in runs and "ceiling" in runs and runs[name].get("steady_img_s"):
            out[f"{name} after its first epoch/ceiling"] = round(_share(runs[name], runs["ceiling"], "steady_img_s"), 3)
    return out


def _share(run: dict, ceiling_run: dict, key: str = "train_img_s") -> float:
    """``run``'s train images/s (``key``: all epochs, or ``steady_img_s``) over the ceiling's."""
    return run[key] / ceiling_run["train_img_s"]


def _cell(value) -> str:
    return "–" if value is None else str(value)


def _notes(run: dict, runs: dict) -> str:
    plain, ceiling_run = runs.get("plain"), runs.get("ceiling")
    if run["name"] == "plain":
        return "the book's loop, fp32"
    if run["name"] == "ceiling":
        return f"bare step on data in memory, {run['steps']} steps; {run['precision']}"
    notes = []
    if plain:
        notes.append(f"{run['train_img_s'] / plain['train_img_s']:.1f}x plain")
    if ceiling_run and not run.get("features_s"):
        notes.append(f"{100 * _share(run, ceiling_run):.0f}% of the ceiling")
        if run.get("steady_img_s"):
            notes.append(f"{100 * _share(run, ceiling_run, 'steady_img_s'):.0f}% after its first epoch")
    if run.get("features_s"):  # head-only epochs: images/s of the head alone says little
        notes = [f"features once {run['features_s']} s, then {run['epoch_s'] * 1000:.0f} ms per head epoch"]
    if run["name"] == "trainer-compile":
        notes.append(f"first epoch (compiling) {run['first_epoch_s']} s")
    text = ", ".join(notes)
    return text + f"; {run['precision']}, decode cache built in {run['decode_cache_s']} s"


def table(report: dict) -> str:
    """The Markdown table of a report."""
    rows = ["| run | train img/s | s per epoch | eval img/s | test acc | wall s | notes |",
            "|---|---|---|---|---|---|---|"]
    runs = {run["name"]: run for run in report["runs"]}
    for run in report["runs"]:
        rows.append(f"| {run['name']} | {run['train_img_s']} | {run['epoch_s']:.3g} | {_cell(run['eval_img_s'])} | "
                    f"{_cell(run['test_acc'])} | {run['wall_s']} | {_notes(run, runs)} |")
    lines = [f"Measured by `make bench` on {report['machine']} ({report['device']}), {report['date']}: "
             f"{report['train_images']} train / {report['test_images']} test images at {report['crop']} px, "
             f"{report['epochs']} epochs.", "", *rows, ""]
    for key, value in report.get("targets", {}).items():
        lines.append(f"- {key}: {value}")
    if "serving" in report:
        from serve_bench import serving_line

        lines.append(f"- {serving_line(report['serving'])}")
    for point in report.get("scale", {}).get("points", []):
        lines.append(f"- scale, {point['images']} images: decode cache {point['cache_img_s_per_core']} img/s per core, "
                     f"peak RSS {point['peak_rss_mb']} MB ({point['peak_anon_rss_mb']} MB anonymous), "
                     f"train {point['train_img_s']} img/s")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> dict:
    """The issue's targets, computed from the runs that ran."""
    runs = {run["name"]: run for run in report["runs"]}
    plain, trainer, head, top = (runs.get(n) for n in ("plain", "trainer", "trainer-freeze", "ceiling"))
    out = {}
    if plain and trainer:
        speedup = trainer["train_img_s"] / plain["train_img_s"]
        out["training speed-up (target >= 2.5x with native bf16)"] = f"{speedup:.2f}x"
    if trainer and top:
        goal = ">= 80%" if report["device"] == "cuda" else ">= 95%"
        share = f"{100 * _share(trainer, top):.0f}%"
        if trainer.get("steady_img_s"):  # like for like: neither times its warm-up
            share = (f"{100 * _share(trainer, top, 'steady_img_s'):.0f}% after its first epoch ({share} with it; the "
                     "ceiling does not time its 2 warm-up steps)")
        out[f"trainer vs bare-step ceiling (target {goal})"] = share
    if trainer and head:
        out["head-only epoch vs full epoch (target >= 50x)"] = f"{trainer['epoch_s'] / head['epoch_s']:.0f}x"
    if trainer and plain:
        out["test accuracy, trainer vs plain"] = (f"{trainer['test_acc']} vs {plain['test_acc']} "
                                                  f"(±{2 * _stderr(plain['test_acc'], report['test_images']):.3f} "
                                                  "is 2 standard errors)")
    if "pipeline" in report:
        p = report["pipeline"]
        out |= {"dvc repro --force on the demo": f"{p['dvc_repro_s']} s",
                "no-op dvc repro (target < 3 s)": f"{p['noop_dvc_repro_s']} s",
                "Prefect overhead per run (target < 15 s)": f"{p['prefect_overhead_s']} s "
                                                           f"(flow {p['flow_s']} s vs by hand {p['by_hand_s']} s)"}
        for variant, stage in p.get("train_stage", {}).items():
            runs = stage.get("overhead_runs_s", [stage["overhead_s"]])
            out[f"train@{variant} overhead, wall minus epochs (target <= 10 s)"] = (
                f"{stage['overhead_s']} s, median of {len(runs)} ({min(runs)}-{max(runs)} s; {stage['wall_s']} s "
                f"for {stage['epochs_s']} s of epochs)")
    return out


def _stderr(accuracy: float, n: int) -> float:
    return (accuracy * (1 - accuracy) / max(n, 1)) ** 0.5


def write_table(page: Path, text: str) -> None:
    """Replace the table between the bench markers of ``page`` (a page without them is left alone)."""
    content = page.read_text() if page.exists() else ""
    if START not in content:
        return
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    page.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", content))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a DVC workspace with validated data (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=5, help="the recipe's 5")
    parser.add_argument("--crop", type=int, default=224, help="train/test crop (the recipe: 224)")
    parser.add_argument("--resize", type=int, default=256, help="test resize (the recipe: 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--augment-on", choices=["auto", "cpu", "device"],
                        help="the trainer runs' augment_on (default: params.yaml's)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's (params.yaml train.finetune)")
    parser.add_argument("--ceiling-steps", type=int, default=10, help="timed bare steps (after 2 warm-up steps)")
    parser.add_argument("--out", type=Path, help="the JSON report (default: reports/bench-<device>.json)")
    parser.add_argument("--page", type=Path, default=SPEED_PAGE, help="page whose bench table is rewritten")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="the training part alone: no dvc / Prefect timings, no pydantic, MLflow, DVC or Prefect "
                             "imported; without --workspace on a generated set")
    parser.add_argument("--train-images", type=int, default=2016, help="--no-pipeline's generated set (hot-dog size)")
    parser.add_argument("--test-images", type=int, default=800, help="--no-pipeline's generated set")
    parser.add_argument("--scale", type=int, metavar="N", help="also the scale check on an N-image generated set")
    parser.add_argument("--scale-steps", type=int, default=20, help="training steps per scale point")
    parser.add_argument("--serving-requests", type=int, default=2000, help="the serving row's requests (0: no row)")
    parser.add_argument("--serving-concurrency", type=int, default=16, help="the serving row's concurrent clients")
    parser.add_argument("--serving-model", help="the model the serving row serves (default: the workspace's production)")
    parser.add_argument("--serving-only", action="store_true",
                        help="only the serving row, added to the existing report (--out) and its table")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runs.split(",")) - set(RUNS))
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    return args


def measure(args: argparse.Namespace, ws: Path) -> list[dict]:
    """The selected runs, each from its own cold decode cache."""
    chosen = args.runs.split(",")
    extra = {"augment_on": args.augment_on} if args.augment_on else {}
    read = plain_settings if args.no_pipeline else settings
    with tempfile.TemporaryDirectory() as cache:
        def sized(strategy="full", name=""):
            return read(ws, args.epochs, args.crop, args.resize, args.device, strategy,
                        Path(cache) / (name or strategy), args.batch_size)

        plan = {"plain": lambda: plain_recipe(sized(), ws),
                "trainer": lambda: project_trainer(sized(), ws, "trainer", **extra),
                "trainer-compile": lambda: project_trainer(sized(name="compile"), ws, "trainer-compile", compile=True,
                                                           **extra),
                "trainer-freeze": lambda: project_trainer(sized("freeze"), ws, "trainer-freeze", **extra),
                "ceiling": lambda: ceiling(sized(), args.ceiling_steps)}
        return [plan[name]() for name in RUNS if name in chosen]


def serving_row(args: argparse.Namespace, ws: Path, device: torch.device) -> dict:
    """The serving row (bench/serve_bench.py), naming the machine and date it was measured on."""
    from serve_bench import serving_timings

    row = serving_timings(ws, args.serving_requests, args.serving_concurrency, args.serving_model)
    return {"machine": f"{machine(device)} ({device.type})", "date": time.strftime("%Y-%m-%d")} | row


def serving_only(args: argparse.Namespace, device: torch.device) -> int:
    """--serving-only: measure the serving row and put it into the existing report and table."""
    ws = (args.workspace or demo_workspace()).resolve()
    out = args.out or REPO / "reports" / f"bench-{device.type}.json"
    report = json.loads(out.read_text()) if out.exists() else {}
    report["serving"] = serving_row(args, ws, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if "runs" in report:  # a whole report: its table, with the new row
        text = table(report)
        if device.type == "cpu" or args.page != SPEED_PAGE:
            write_table(args.page, text)
    from serve_bench import serving_line

    print(serving_line(report["serving"]))
    print(f"written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = pick_device(args.device)
    if args.serving_only:
        return serving_only(args, device)
    with tempfile.TemporaryDirectory() as generated:
        if args.no_pipeline and args.workspace is None:
            ws = Path(generated)
            generate_set(ws, args.train_images, args.test_images)
        else:
            ws = (args.workspace or demo_workspace()).resolve()
            if not args.no_pipeline:
                ensure_workspace(ws)
        runs = measure(args, ws)
        read = plain_settings if args.no_pipeline else settings
        params = read(ws, args.epochs, args.crop, args.resize, args.device)
        train_ds, test_ds, _ = load_splits(ws / params.data.dir, ws / params.validate_.files, None, None)
        report = {"machine": machine(device), "device": device.type, "date": time.strftime("%Y-%m-%d"),
                  "epochs": args.epochs, "crop": args.crop, "train_images": len(train_ds),
                  "test_images": len(test_ds), "runs": runs}
        if not args.no_pipeline:
            report["pipeline"] = pipeline_timings(ws)  # it leaves a production model in the workspace
            if args.serving_requests > 0:
                report["serving"] = serving_row(args, ws, device)
    if args.scale:
        report["scale"] = scale_check(args)
    report["ratios"], report["targets"] = ratios(report), targets(report)
    out = args.out or REPO / "reports" / f"bench-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    print(text)
    if device.type == "cpu" or args.page != SPEED_PAGE:
        write_table(args.page, text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
