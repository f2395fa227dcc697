"""bench/bench.py's report: the table, the ratios and targets, the docs/speed.md section it
rewrites, and its training part alone (--no-pipeline) at tiny sizes without the pipeline's stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from finetune.core.config import load_params

sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402

STACK = ("pydantic", "mlflow", "dvc", "prefect")


def report(plain_rate: float, trainer_rate: float, ceiling_rate: float = 40.0) -> dict:
    def run(name, rate, epoch_s, **extra):
        return {"name": name, "train_img_s": rate, "train_s": epoch_s * 2, "epoch_s": epoch_s, "eval_img_s": 50.0,
                "test_acc": 0.7, "wall_s": 10.0, **extra}

    trainer = {"precision": "bf16", "decode_cache_s": 0.5, "features_s": 0.0, "first_epoch_s": 4.0,
               "steady_img_s": 38.0}
    return {"machine": "a test", "device": "cpu", "date": "2026-01-01", "epochs": 2, "crop": 224,
            "train_images": 100, "test_images": 100,
            "runs": [run("plain", plain_rate, 8.0),
                     run("trainer", trainer_rate, 4.0, **trainer),
                     run("trainer-compile", 36.0, 3.0, **trainer | {"first_epoch_s": 50.0}),
                     run("trainer-freeze", 9999.0, 0.02, **trainer | {"features_s": 3.0}),
                     run("ceiling", ceiling_rate, 2.5, eval_img_s=None, test_acc=None, precision="bf16", steps=10)],
            "pipeline": {"dvc_repro_s": 100.0, "noop_dvc_repro_s": 0.9, "flow_s": 20.0, "by_hand_s": 12.0,
                         "prefect_overhead_s": 8.0,
                         "train_stage": {"scratch": {"wall_s": 20.5, "epochs_s": 11.0, "overhead_s": 9.5,
                                                     "overhead_runs_s": [9.5, 10.2, 8.9]}}}}


def test_targets_and_ratios_are_computed_from_the_runs():
    data = report(10.0, 30.0)
    targets = bench.targets(data)
    assert targets["training speed-up (target >= 2.5x with native bf16)"] == "3.00x"
    assert targets["trainer vs bare-step ceiling (target >= 95%)"] == (  # 38 / 40, 30 / 40
        "95% after its first epoch (75% with it; the ceiling does not time its 2 warm-up steps)")
    assert targets["head-only epoch vs full epoch (target >= 50x)"] == "200x"  # 4 s / 0.02 s
    assert targets["Prefect overhead per run (target < 15 s)"].startswith("8.0 s")
    overhead = targets["train@scratch overhead, wall minus epochs (target <= 10 s)"]
    assert overhead == "9.5 s, median of 3 (8.9-10.2 s; 20.5 s for 11.0 s of epochs)"
    assert bench.ratios(data) == {"trainer/ceiling": 0.75, "trainer/plain": 3.0, "trainer-compile/ceiling": 0.9,
                                  "trainer-compile/plain": 3.6, "trainer after its first epoch/ceiling": 0.95,
                                  "trainer-compile after its first epoch/ceiling": 0.95}
    data["device"] = "cuda"
    del data["runs"][1]["steady_img_s"]  # one epoch: nothing after the first
    assert bench.targets(data)["trainer vs bare-step ceiling (target >= 80%)"] == "75%"


def test_the_speed_page_table_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "speed.md"
    readme.write_text(f"# intro\n{bench.START}\nold table\n{bench.END}\ntail\n")
    data = report(12.0, 30.0)
    data["targets"] = bench.targets(data)
    bench.write_table(readme, bench.table(data))
    text = readme.read_text()
    assert text.startswith("# intro\n") and text.endswith(f"{bench.END}\ntail\n") and "old table" not in text
    assert ("| trainer | 30.0 | 4 | 50.0 | 0.7 | 10.0 | 2.5x plain, 75% of the ceiling, 95% after its first epoch; "
            "bf16") in text
    assert "| ceiling | 40.0 | 2.5 | – | – | 10.0 | bare step on data in memory, 10 steps; bf16 |" in text
    assert "first epoch (compiling) 50.0 s" in text
    assert "features once 3.0 s, then 20 ms per head epoch" in text


def test_plain_settings_read_what_the_typed_settings_read(tmp_path):
    """--no-pipeline reads params.yaml without pydantic: the same values as finetune.core.config."""
    plain = bench.plain_settings(tmp_path, 3, 64, 72, "cpu", cache=tmp_path, batch_size=8)
    recipe = load_params(REPO / "params.yaml").train["finetune"].model_dump()
    expected = recipe | {"epochs": 3, "device": "cpu", "strategy": "full", "batch_size": 8} | bench.SPEED_ONLY
    assert vars(plain.train["finetune"]) == expected
    model = plain.model
    assert (model.train_crop, model.test_crop, model.test_resize, model.weights) == (64, 64, 72, "none")
    assert plain.cache.dir == tmp_path and plain.data.dir == load_params(REPO / "params.yaml").data.dir


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One tiny `bench.py --no-pipeline --scale` run in a fresh interpreter: its report and the
    pipeline libraries it imported."""
    folder = tmp_path_factory.mktemp("bench")
    args = ["--no-pipeline", "--train-images", "8", "--test-images", "4", "--epochs", "1", "--crop", "32",
            "--resize", "36", "--batch-size", "4", "--device", "cpu", "--augment-on", "device",
            "--runs", "plain,trainer,ceiling", "--ceiling-steps", "1", "--scale", "12", "--scale-steps", "1", "--out", str(folder / "bench-cpu.json"),
            "--page", str(folder / "speed.md")]
    code = ("import json, sys; sys.path.insert(0, 'bench'); import bench; bench.main(sys.argv[1:]); "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(STACK)!r}))))")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((folder / "bench-cpu.json").read_text()), json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
def test_no_pipeline_imports_none_of_the_pipeline_stack(tiny_bench):
    _, imported = tiny_bench
    assert imported == []


@pytest.mark.slow
def test_the_report_names_its_machine_device_date_and_runs(tiny_bench):
    data, _ = tiny_bench
    assert data["device"] == "cpu" and "cores" in data["machine"] and data["date"]
    assert [run["name"] for run in data["runs"]] == ["plain", "trainer", "ceiling"]
    assert data["train_images"] == 8 and data["test_images"] == 4
    assert set(data["ratios"]) == {"trainer/ceiling", "trainer/plain"} and all(v > 0 for v in data["ratios"].values())
    assert "pipeline" not in data
    assert data["runs"][1]["augment_on"] == "device"  # --augment-on reaches the trainer's settings


@pytest.mark.slow
def test_the_scale_check_reports_cache_rate_memory_and_speed(tiny_bench):
    """--scale 12: one point (12 is below 10,000) on this machine's cores, whose cache rate is its
    12 images over its build time per core (within the report's rounding), whose memory is what a
    Python process with torch holds (anonymous within resident, both below the machine's RAM) and
    whose training speed is a CPU's at 32 px."""
    data, _ = tiny_bench
    scale = data["scale"]
    assert (scale["images"], scale["steps"], scale["cores"]) == (12, 1, os.cpu_count()) and scale["generate_s"] >= 0
    (point,) = scale["points"]
    assert point["images"] == 12
    rate, build_s, cores = point["cache_img_s_per_core"], point["cache_build_s"], scale["cores"]
    assert rate > 0 and build_s >= 0
    # rate = images / build_s / cores, each rounded to 0.1: the exact values' intervals meet.
    fastest, slowest = 12 / cores / (build_s + 0.05), 12 / cores / max(build_s - 0.05, 1e-9)
    assert fastest <= rate + 0.05 and rate - 0.05 <= slowest, (rate, build_s, cores)
    machine_mb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal:")).split()[1]) / 1024
    assert 50 <= point["peak_anon_rss_mb"] <= point["peak_rss_mb"] < machine_mb  # torch alone is over 50 MB
    assert 0 < point["train_img_s"] < 10_000  # one step of 4 images of 32 px on a CPU


def test_a_stage_overhead_is_its_wall_time_less_its_recorded_epochs(tmp_path, monkeypatch):
    (tmp_path / "plots" / "train").mkdir(parents=True)
    (tmp_path / "plots" / "train" / "scratch.csv").write_text("epoch,seconds,val_acc\n1,2.25,0.5\n2,1.75,0.6\n")
    commands, walls = [], iter([10.0, 12.5, 9.0])
    monkeypatch.setattr(bench, "timed", lambda command, cwd: commands.append(command) or next(walls))
    assert bench.stage_overhead(tmp_path, "scratch") == {"wall_s": 10.0, "epochs_s": 4.0, "overhead_s": 6.0,
                                                         "overhead_runs_s": [6.0, 8.5, 5.0]}
    assert len(commands) == 3 and commands[0][-4:] == ["repro", "--force", "--single-item", "train@scratch"]


def test_the_serving_row_is_a_line_under_the_table_naming_its_machine():
    data = report(12.0, 30.0)
    data["serving"] = {"machine": "AMD EPYC, 2 cores (cpu)", "date": "2026-12-07", "model": "production",
                       "requests": 2000, "concurrency": 16, "image": "500x375 JPEG", "req_s": 11.0, "wall_s": 181.8,
                       "p50_ms": 1416.0, "p95_ms": 2093.1, "p99_ms": 2451.8, "statuses": {"200": 2000},
                       "rss_before_mb": 1085.7, "rss_after_mb": 1103.1}
    assert ("- serving, on AMD EPYC, 2 cores (cpu), 2026-12-07 (production, 2,000 requests of one 500x375 JPEG at "
            "concurrency 16): 11.0 req/s, p50 1416.0 ms, p95 2093.1 ms, p99 2451.8 ms; server RSS 1085.7 MB before, "
            "1103.1 MB after; 2000 × 200") in bench.table(data)
