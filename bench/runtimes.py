"""Speed of each runtime on one model, in one run (prints JSON): ms per view one at a time,
views per second in batches (without and with a defect map of every view, as the line draws
them), and how far each runtime's scores are from PyTorch's.

    python -m bench.runtimes --model bench-out/accuracy/model-... --data ../shared/data/mtd \
        --json bench-out/runtimes.json

The model is exported (ONNX, OpenVINO) first where it has no export yet. Views are the test
images of DATA; every runtime scores the same prepared views, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import emit
from workers.datasets import list_test_samples
from workers.differnet.export import EXPORT_FILE, export_folder, export_model
from workers.differnet.recipes import load_samples
from workers.differnet.store import load_model
from workers.threshold import auroc

RUNTIMES = ("torch", "onnx", "openvino")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--views", type=int, default=96, help="test images scored per runtime")
    p.add_argument("--batch", type=int, default=8)
    return p.parse_args(argv)


def _views_per_s(score, prepared: list, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(prepared), batch):
        score(prepared[i : i + batch])
    return len(prepared) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    for fmt in ("onnx", "openvino"):
        if not (export_folder(args.model, fmt) / EXPORT_FILE).exists():
            bundle = load_model(args.model, "cpu")
            onnx = export_folder(args.model, "onnx")
            export_model(bundle, fmt, export_folder(args.model, fmt), onnx)
    samples = list_test_samples(args.data)
    step = max(1, len(samples) // args.views)
    loaded = load_samples(samples[::step][: args.views])
    labels = [int(s.is_defect) for s in loaded.samples]
    rows, scores = [], {}
    for runtime in RUNTIMES:
        model = load_model(args.model, "cpu", runtime).model
        prepared = loaded.prepared(model)
        model.score_batch(prepared[: args.batch])  # warm-up: first calls plan their shapes
        t0 = time.perf_counter()
        single = [model.score_batch([p])[0].score for p in prepared]
        one_ms = (time.perf_counter() - t0) * 1e3 / len(prepared)
        per_s = _views_per_s(model.score_batch, prepared, args.batch)
        # What the line pays for a defect map of every view (the regions come from it).
        mapped_per_s = _views_per_s(model.defect_maps, prepared, args.batch)
        scores[runtime] = np.array(single)
        rows.append(
            {
                "runtime": runtime,
                "ms_per_view": round(one_ms, 1),
                f"views_per_s_batch_{args.batch}": round(per_s, 2),
                f"views_per_s_batch_{args.batch}_with_maps": round(mapped_per_s, 2),
                "image_auroc": auroc(single, labels),
            }
        )
    spread = float(scores["torch"].max() - scores["torch"].min())
    for row in rows:
        diff = float(np.abs(scores[row["runtime"]] - scores["torch"]).max())
        row["max_score_diff_over_range"] = diff / spread
        row["speed_vs_torch"] = round(rows[0]["ms_per_view"] / row["ms_per_view"], 2)
    return emit(
        {
            "model": str(args.model),
            "data": str(args.data),
            "n_views": len(prepared),
            "torch_threads": torch.get_num_threads(),
            "runtimes": rows,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
