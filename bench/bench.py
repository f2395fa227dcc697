"""`make bench`: the plain recipe loop against the project's trainer, side by side, plus the
pipeline's own costs (dvc repro, no-op dvc repro, Prefect overhead).

On the same data (the demo workspace's generated dataset unless --workspace names another),
the same model and starting weights, the same epochs, crops and optimiser settings (the
recipe's: params.yaml's train.finetune, batch 128):

(a) plain: the book's loop: PIL decode + transforms every epoch, fp32, contiguous tensors,
    DataLoader(shuffle, num_workers=4), plain SGD at the recipe's rates;
(b) trainer: finetune's own `fit` with params.yaml defaults (decode cache, bf16 autocast where
    the CPU/GPU has it, channels_last, DataLoader workers auto), a cold decode cache included;
(c) head: the same trainer with strategy freeze (cached features): head-only epochs.

Prints a table, writes JSON (--out) and the table of docs/speed.md between its bench markers.
Numbers are measured here, on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Params, load_params
from finetune.data.images import eval_transform, load_splits, train_transform
from finetune.demo.workspace import stage_env
from finetune.model.factory import build_model, weights_path
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.runtime import pick_device, predict, resolve_runtime, seed_everything

REPO = Path(__file__).resolve().parents[1]
# The book's num_workers=4 on a machine with fewer cores: what the plain loop is, said once here.
warnings.filterwarnings("ignore", message="This DataLoader will create")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SPEED_PAGE = REPO / "docs" / "speed.md"


def settings(ws: Path, epochs: int, crop: int, resize: int, device: str, strategy: str = "full",
             cache: Path | None = None) -> Params:
    """The workspace's data and weights; the project's own train.finetune defaults (the recipe:
    batch 128, its learning rates), not the demo's laptop-sized ones; the bench's image sizes,
    epochs and device."""
    params = load_params(ws / "params.yaml")
    model = params.model.model_copy(update={"train_crop": crop, "test_resize": resize, "test_crop": crop})
    defaults = load_params(REPO / "params.yaml").train["finetune"]
    cfg = defaults.model_copy(update={"epochs": epochs, "device": device, "strategy": strategy})
    update = {"model": model, "train": {**params.train, "finetune": cfg}}
    if cache is not None:
        update["cache"] = params.cache.model_copy(update={"dir": cache})
    return params.model_copy(update=update)


def plain_recipe(params: Params, ws: Path) -> dict:
    """(a) The book's loop, written out as the book writes it."""
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
    head = {id(p) for p in net.fc.parameters()}
    body = [p for p in net.parameters() if id(p) not in head]
    trainer = torch.optim.SGD([{"params": body}, {"params": net.fc.parameters(), "lr": cfg.lr * cfg.head_lr_mult}],
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


def project_trainer(params: Params, ws: Path, name: str) -> dict:
    """(b)/(c) finetune's trainer with its defaults, timed from a cold decode cache."""
    # The plain loop trains on every train image and watches nothing: so does the trainer here.
    cfg = params.train["finetune"].model_copy(update={"val_fraction": 0, "select": "last", "early_stopping": None})
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
    result |= {"precision": runtime.precision, "channels_last": runtime.channels_last,
               "decode_cache_s": round(cache_s, 2), "features_s": round(sum(s.features_seconds for s in history), 2)}
    return result


def _result(name, seen, train_s, epochs, eval_rate, accuracy, wall) -> dict:
    return {"name": name, "train_img_s": round(seen / train_s, 1), "train_s": round(train_s, 2),
            "epoch_s": round(train_s / epochs, 4), "eval_img_s": round(eval_rate, 1), "test_acc": round(accuracy, 4),
            "wall_s": round(wall, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(command: list[str], cwd: Path) -> float:
    """Wall seconds of ``command`` in ``cwd``; its failure stops the bench with its output."""
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
            "by_hand_s": round(by_hand, 1), "prefect_overhead_s": round(flow - by_hand, 1)}


def ensure_workspace(ws: Path) -> None:
    """The demo workspace with its data validated and its source model trained (make demo's first half)."""
    if ws == REPO / load_params(REPO / "params.yaml").demo.workspace:
        timed([sys.executable, "-m", "finetune", "demo-setup"], REPO)
    timed([sys.executable, "-m", "dvc", "repro", "validate", "pretrain"], ws)


def machine(device: torch.device) -> str:
    """One line naming the machine the numbers came from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(report: dict) -> str:
    """The Markdown table of a report."""
    rows = ["| run | train img/s | s per epoch | eval img/s | test acc | wall s | notes |",
            "|---|---|---|---|---|---|---|"]
    plain = report["runs"][0]
    for run in report["runs"]:
        notes = f"{run['train_img_s'] / plain['train_img_s']:.1f}x plain" if run is not plain else "the book's loop, fp32"
        if run.get("features_s"):  # head-only epochs: images/s of the head alone says little
            notes = f"features once {run['features_s']} s, then {run['epoch_s'] * 1000:.0f} ms per head epoch"
        if "precision" in run:
            notes += f"; {run['precision']}, decode cache built in {run['decode_cache_s']} s"
        rows.append(f"| {run['name']} | {run['train_img_s']} | {run['epoch_s']:.3g} | {run['eval_img_s']} | "
                    f"{run['test_acc']} | {run['wall_s']} | {notes} |")
    lines = [f"Measured by `make bench` on {report['machine']} ({report['device']}), {report['date']}: "
             f"{report['train_images']} train / {report['test_images']} test images at {report['crop']} px, "
             f"{report['epochs']} epochs.", "", *rows, ""]
    for key, value in report.get("targets", {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> dict:
    plain, trainer, head = report["runs"]
    out = {"training speed-up (target >= 2.5x)": f"{trainer['train_img_s'] / plain['train_img_s']:.2f}x",
           "head-only epoch vs full epoch (target >= 50x)": f"{trainer['epoch_s'] / head['epoch_s']:.0f}x",
           "test accuracy, trainer vs plain": f"{trainer['test_acc']} vs {plain['test_acc']} "
                                              f"(±{2 * _stderr(plain['test_acc'], report['test_images']):.3f} is 2 standard errors)"}
    if "pipeline" in report:
        p = report["pipeline"]
        out |= {"dvc repro --force on the demo": f"{p['dvc_repro_s']} s",
                "no-op dvc repro (target < 3 s)": f"{p['noop_dvc_repro_s']} s",
                "Prefect overhead per run (target < 15 s)": f"{p['prefect_overhead_s']} s "
                                                           f"(flow {p['flow_s']} s vs by hand {p['by_hand_s']} s)"}
    return out


def _stderr(accuracy: float, n: int) -> float:
    return (accuracy * (1 - accuracy) / max(n, 1)) ** 0.5


def write_table(page: Path, text: str) -> None:
    """Replace the table between the bench markers of ``page`` (a page without them is left alone)."""
    content = page.read_text()
    if START not in content:
        return
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    page.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", content))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a DVC workspace with validated data (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=5, help="the recipe's 5")
    parser.add_argument("--crop", type=int, default=224, help="train/test crop (the recipe: 224)")
    parser.add_argument("--resize", type=int, default=256, help="test resize (the recipe: 256)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench.json")
    parser.add_argument("--page", type=Path, default=SPEED_PAGE, help="page whose bench table is rewritten")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the dvc repro / Prefect timings")
    args = parser.parse_args(argv)
    ws = (args.workspace or REPO / load_params(REPO / "params.yaml").demo.workspace).resolve()
    ensure_workspace(ws)
    with tempfile.TemporaryDirectory() as cache:
        def sized(strategy="full"):
            return settings(ws, args.epochs, args.crop, args.resize, args.device, strategy, Path(cache) / strategy)

        runs = [plain_recipe(sized(), ws), project_trainer(sized(), ws, "trainer"),
                project_trainer(sized("freeze"), ws, "trainer, freeze")]
    device = pick_device(args.device)
    params = load_params(ws / "params.yaml")
    train_ds, test_ds, _ = load_splits(ws / params.data.dir, ws / params.validate_.files, None, None)
    report = {"machine": machine(device), "device": str(device), "date": time.strftime("%Y-%m-%d"),
              "epochs": args.epochs, "crop": args.crop, "train_images": len(train_ds),
              "test_images": len(test_ds), "runs": runs}
    if not args.no_pipeline:
        report["pipeline"] = pipeline_timings(ws)
    report["targets"] = targets(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    print(text)
    if device.type == "cpu" or args.page != SPEED_PAGE:
        write_table(args.page, text)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
