"""bench/bench.py's report: the table, the targets and the docs/speed.md section it rewrites."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench  # noqa: E402


def report(plain_rate: float, trainer_rate: float) -> dict:
    def run(name, rate, epoch_s, **extra):
        return {"name": name, "train_img_s": rate, "train_s": epoch_s * 2, "epoch_s": epoch_s, "eval_img_s": 50.0,
                "test_acc": 0.7, "wall_s": 10.0, **extra}

    return {"machine": "a test", "device": "cpu", "date": "2026-01-01", "epochs": 2, "crop": 224,
            "train_images": 100, "test_images": 100,
            "runs": [run("plain", plain_rate, 8.0),
                     run("trainer", trainer_rate, 4.0, precision="bf16", decode_cache_s=0.5, features_s=0.0),
                     run("trainer, freeze", 9999.0, 0.02, precision="bf16", decode_cache_s=0.5, features_s=3.0)],
            "pipeline": {"dvc_repro_s": 100.0, "noop_dvc_repro_s": 0.9, "flow_s": 20.0, "by_hand_s": 12.0,
                         "prefect_overhead_s": 8.0}}


def test_targets_are_computed_from_the_runs():
    targets = bench.targets(report(10.0, 30.0))
    assert targets["training speed-up (target >= 2.5x)"] == "3.00x"
    assert targets["head-only epoch vs full epoch (target >= 50x)"] == "200x"  # 4 s / 0.02 s
    assert targets["Prefect overhead per run (target < 15 s)"].startswith("8.0 s")


def test_the_speed_page_table_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "speed.md"
    readme.write_text(f"# intro\n{bench.START}\nold table\n{bench.END}\ntail\n")
    data = report(12.0, 30.0)
    data["targets"] = bench.targets(data)
    bench.write_table(readme, bench.table(data))
    text = readme.read_text()
    assert text.startswith("# intro\n") and text.endswith(f"{bench.END}\ntail\n") and "old table" not in text
    assert "| trainer | 30.0 | 4 | 50.0 | 0.7 | 10.0 | 2.5x plain; bf16" in text
    assert "features once 3.0 s, then 20 ms per head epoch" in text
