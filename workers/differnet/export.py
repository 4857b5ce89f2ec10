"""Exported models: the scorer's networks as graphs that ONNX Runtime or OpenVINO runs.

    MODEL_DIR/export-onnx/export.json   the model it came from (its sha256), every file's
                                        sha256, the opset, the model's input contract
    MODEL_DIR/export-onnx/pooled.onnx   backbone, pooling, standardisation and flow: letterboxed
                                        views at each scale (pixels_i) with their product cover
                                        at each tap's grid (cover_i_t) -> NLL (N,)
    MODEL_DIR/export-onnx/memory.onnx   the patch memory's backbone: a view at the memory's size
                                        (1, 3, h, w), any h and w -> features (1, D, h', w')
    MODEL_DIR/export-openvino/          the same graphs in OpenVINO's IR (.xml and .bin)

What is data rather than computation stays in the model folder and its checked weights file: the
memory's positions, the calibration, the thresholds. Views are prepared (letterbox, memory size,
tiles) by the same code for every runtime, and the memory is searched by the same code, so a
runtime replaces only the networks and its scores agree with PyTorch's to float precision.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from workers.contract import Runtime
from workers.weights import sha256_of, verified

ExportFormat = Literal["onnx", "openvino"]
EXPORT_FILE = "export.json"
OPSET = 18
# The graphs' inputs: a batch of views, or one view at the memory's size.
MAX_BATCH = 4096
MAX_SIDE = 8192


class ExportError(ValueError):
    """A model that cannot be exported, or an export that cannot be used; says why."""


def export_folder(model_dir: Path, fmt: ExportFormat) -> Path:
    return Path(model_dir) / f"export-{fmt}"


class _PooledNLL(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *scaled: torch.Tensor) -> torch.Tensor:
        return self.model.pooled_nll(*scaled)


class _MemoryFeatures(nn.Module):
    def __init__(self, memory):
        super().__init__()
        self.memory = memory

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.memory.features(pixels)


def export_model(bundle, fmt: ExportFormat, out: Path, onnx: Path | None = None) -> Path:
    """Write the graphs of a loaded model (a ``ModelBundle`` on the CPU) as ``fmt`` into
    ``out`` (the runtimes look in :func:`export_folder`); returns the folder. ``onnx``: a folder
    that may hold this model's ONNX export, which OpenVINO then converts (tracing the model
    again gives the same graphs, in seconds more)."""
    if fmt not in ("onnx", "openvino"):
        raise ExportError(f"unknown export format {fmt!r}: onnx or openvino")
    model = bundle.model
    if model.config.head != "differnet":
        raise ExportError("only the pooled (differnet) head exports; the local head does not")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    traced = None
    if fmt == "openvino" and onnx is not None:
        try:
            traced = read_export(onnx, "onnx", bundle.metadata["sha256"])
        except ExportError:
            traced = None  # not there, or not this model's: traced below
    if traced is not None:
        graphs = {name: out / path.name for name, path in traced.items()}
        for name, path in traced.items():
            shutil.copyfile(path, graphs[name])
    else:
        graphs = _traced(model, out)
    if fmt == "openvino":
        graphs = {name: _to_openvino(path) for name, path in graphs.items()}
    files = sorted(p.name for p in out.iterdir() if p.name != EXPORT_FILE)
    record = {
        "format": fmt,
        "model_sha256": bundle.metadata["sha256"],
        "graphs": {name: path.name for name, path in graphs.items()},
        "files": {name: sha256_of(out / name) for name in files},
        "opset": OPSET,
        "input_contract": bundle.metadata.get("input_contract"),
        "exported": time.time(),
        "torch": torch.__version__,
    }
    tmp = out / (EXPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / EXPORT_FILE)
    return out


def _traced(model, out: Path) -> dict[str, Path]:
    """The model's pooled flow (and patch memory backbone) traced to ONNX files in ``out``."""
    size = model.config.image_size
    graphs = {"pooled": out / "pooled.onnx"}
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    scaled = model.embedder.scaled(torch.rand(2, 3, size, size), torch.ones(2, 1, size, size))
    taps = len(model.embedder.backbone.taps)
    names = [
        name
        for i in range(len(model.config.scales))
        for name in [f"pixels_{i}"] + [f"cover_{i}_{t}" for t in range(taps)]
    ]
    dynamic = [({0: batch},) * len(names)]  # forward(*scaled): one argument, a tuple
    _onnx(_PooledNLL(model), tuple(scaled), graphs["pooled"], dynamic, names, "nll")
    if model.uses_memory:
        graphs["memory"] = out / "memory.onnx"
        side = model.config.memory_side
        h, w = (torch.export.Dim(n, min=32, max=MAX_SIDE) for n in ("height", "width"))
        _onnx(
            _MemoryFeatures(model.memory),
            (torch.rand(1, 3, side, side + 8),),
            graphs["memory"],
            [{2: h, 3: w}],
            ["pixels"],
            "features",
        )
    return graphs


def _onnx(module, example, path: Path, dynamic, inputs: list[str], output: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # Every input's batch axis is one dimension, named once: the exporter says so, at length.
        warnings.filterwarnings("ignore", message="The axis name")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=[output],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _to_openvino(onnx_path: Path) -> Path:
    import openvino as ov

    xml = onnx_path.with_suffix(".xml")
    # Weights kept in float32 (save_model halves them by default): the scores must be the model's.
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    onnx_path.unlink()
    return xml


def read_export(folder: Path, fmt: ExportFormat, model_sha256: str) -> dict[str, Path]:
    """The graphs of the ``fmt`` export in ``folder``, by name, once the export is shown to be
    of the model ``model_sha256`` and every file to hash as recorded."""
    folder = Path(folder)
    path = folder / EXPORT_FILE
    if not path.is_file():
        raise ExportError(
            f"{folder}: no {fmt} export here (defectflow export MODEL_DIR --format {fmt} writes "
            "one)"
        )
    try:
        record = json.loads(path.read_text())
        files, graphs = dict(record["files"]), dict(record["graphs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path}: not an export record ({exc})") from None
    if record.get("format") != fmt:
        raise ExportError(f"{folder}: a {record.get('format')} export, not {fmt}")
    if record.get("model_sha256") != model_sha256:
        raise ExportError(
            f"{folder}: exported from model {str(record.get('model_sha256'))[:16]}, not "
            f"{model_sha256[:16]}: export this model again"
        )
    for name, sha in files.items():
        verified(folder / name, sha, f"{fmt} graph")
    return {name: folder / file for name, file in graphs.items()}


class ExportedNetworks:
    """The graphs of an export, checked against the model and their recorded sha256, run by
    ONNX Runtime or OpenVINO on the CPU with as many threads as PyTorch uses."""

    def __init__(self, folder: Path, runtime: ExportFormat, model_sha256: str):
        graphs = read_export(folder, runtime, model_sha256)
        threads = torch.get_num_threads()
        run = _onnxruntime if runtime == "onnx" else _openvino
        self.runtime = runtime
        self._pooled = run(graphs["pooled"], threads)
        self._memory = run(graphs["memory"], threads) if "memory" in graphs else None

    def pooled_nll(self, *scaled: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._pooled([_array(x) for x in scaled]))

    def memory_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._memory is None:
            raise ExportError("this export has no patch memory graph")
        return torch.from_numpy(self._memory([_array(pixels)]))


def _array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().float().numpy())


def _onnxruntime(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda arrays: session.run(None, dict(zip(names, arrays, strict=True)))[0]


def _openvino(path: Path, threads: int):
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    # float32 throughout: on a CPU with bfloat16 OpenVINO would compute in it by default, and
    # the scores would no longer be the model's.
    config = {hints.inference_precision: ov.Type.f32, props.inference_num_threads: threads}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda arrays: request.infer(arrays)[compiled.output(0)].copy()


def use_runtime(bundle, model_dir: Path, runtime: Runtime):
    """``bundle`` scoring with ``runtime``'s graphs (onnx or openvino) from the model folder's
    export."""
    if runtime not in ("onnx", "openvino"):
        raise ExportError(f"unknown runtime {runtime!r}: torch, onnx or openvino")
    folder = export_folder(model_dir, runtime)
    bundle.model.use_exported(ExportedNetworks(folder, runtime, bundle.metadata["sha256"]))
    return bundle
