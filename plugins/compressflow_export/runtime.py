"""An ONNX graph run by onnxruntime, carried through the pipeline as a module.

:class:`OnnxModel` is what ``export/onnx`` passes on with ``pass_on: onnxruntime`` and what
the ``quantize/ort-*`` stages take and return. The engine measures it like any model: the
task feeds it (tensors in, tensors out), ``size_bytes`` is the serialized ONNX file (kept
as a uint8 buffer, so ``torch.save`` of its state dict is the file plus a few hundred bytes),
params and zeros are counted over the graph's initializers and MACs over its weight-carrying
ops. onnxruntime runs on as many threads as torch is set to (the timing function sets
them), so a paired timing compares both runtimes on the same threads.

It pickles and deep-copies without its session (rebuilt on the next call), so the engine's
copies and its MLflow record work as for any module; MLflow also gets the graph in its own
``onnx`` flavor, which ``mlflow.onnx.load_model`` and ``mlflow.pyfunc`` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

SUFFIXES = ("_scale", "_zero_point")
"""Initializers onnxruntime's quantizer adds beside each quantized weight (not weights)."""


class OnnxModel(nn.Module):
    """An ONNX graph as a module: ``forward`` feeds onnxruntime and returns torch tensors.

    Attributes:
        input_names: the graph's inputs, in the order positional arguments fill them.
        output_names: the graph's outputs; one output is returned as a tensor, several as a tuple.
        tokenizer: the tokenizer of the model it was exported from (None for tensor models),
            so that text datasets and the saved folder keep it.
        unused: inputs the exported model took but the graph never reads (the exporter
            drops them): accepted and ignored, where any other unknown input is an error.
    """

    def __init__(self, graph: bytes, input_names: list[str], output_names: list[str], *,
                 tokenizer: Any = None, unused: list[str] = ()) -> None:
        super().__init__()
        self.register_buffer("graph", torch.frombuffer(bytearray(graph), dtype=torch.uint8))
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.tokenizer, self.unused = tokenizer, list(unused)
        self._session: Any = None
        self._threads = 0

    @classmethod
    def from_file(cls, path: Path, *, tokenizer: Any = None, unused: list[str] = ()) -> OnnxModel:
        """The graph in ``path`` (one file, weights inside)."""
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        names = [i.name for i in proto.graph.input]
        return cls(path.read_bytes(), names, [o.name for o in proto.graph.output],
                   tokenizer=tokenizer, unused=[n for n in unused if n not in names])

    def graph_bytes(self) -> bytes:
        """The serialized ONNX graph."""
        return self.graph.numpy().tobytes()

    def proto(self) -> Any:
        """The graph as an ``onnx.ModelProto``."""
        import onnx

        return onnx.load_from_string(self.graph_bytes())

    def session(self) -> Any:
        """The onnxruntime session, (re)built when torch's thread count changed."""
        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            self._session, self._threads = make_session(self.graph_bytes(), threads), threads
        return self._session

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """The graph's outputs on the inputs, given by position or by name."""
        if len(args) > len(self.input_names):
            raise TypeError(f"the ONNX graph takes {len(self.input_names)} inputs, got {len(args)}")
        feed = dict(zip(self.input_names, args))
        kwargs = {k: v for k, v in kwargs.items() if k not in self.unused}
        unknown = sorted(set(kwargs) - set(self.input_names))
        if unknown:
            raise TypeError(f"the ONNX graph has no input {', '.join(unknown)} "
                            f"(its inputs: {', '.join(self.input_names)})")
        feed.update(kwargs)
        arrays = {name: value.detach().cpu().numpy() for name, value in feed.items()}
        outputs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session().run(None, arrays)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"], state["_threads"] = None, 0  # a session neither pickles nor copies
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("unused", [])  # records pickled before inputs could go unused
        super().__setstate__(state)

    # figures the engine asks any model for (compressflow.measure)

    def stored_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every initializer that is a weight (not a quantizer's scale or zero point)."""
        from onnx import numpy_helper

        for init in self.proto().graph.initializer:
            if not init.name.endswith(SUFFIXES):
                yield init.name, torch.from_numpy(np.array(numpy_helper.to_array(init)))

    def count_macs(self, example: Any) -> int:
        """MACs of ``example`` (one sample) through the ops that multiply by a weight."""
        from compressflow.task import call_args
        from compressflow_export.graph_macs import graph_macs

        args, kwargs = call_args(example)
        feed = dict(zip(self.input_names, args)) | kwargs
        return graph_macs(self.proto(), {name: value.numpy() for name, value in feed.items()})

    # where users take it

    def save(self, folder: Path) -> Path:
        """``model.onnx`` and the tokenizer's files in ``folder``: what onnxruntime users load."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(self.graph_bytes())
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return folder

    def log_mlflow_flavors(self, signature: Any) -> dict[str, str]:
        """The graph as an MLflow ``onnx`` model beside the engine's record; ``{tag: uri}``."""
        import mlflow.onnx
        import onnx
        import onnxruntime

        info = mlflow.onnx.log_model(
            self.proto(), name="onnx_model", signature=signature, save_as_external_data=False,
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"])
        return {"compressflow.onnx_model_uri": info.model_uri}


def make_session(graph: bytes | str, threads: int) -> Any:
    """An onnxruntime CPU session on ``threads`` intra-op threads, quiet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # onnxruntime's pool threads spin after each run by default, taking the cores from
    # whatever runs next: in a paired timing, the model it is compared with
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
