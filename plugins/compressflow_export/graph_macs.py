"""MACs of an ONNX graph, counted as :func:`compressflow.measure.count_macs` counts a module's.

The torch count covers Linear and Conv layers: products with a *weight*. Here that is every
``MatMul``/``MatMulInteger``/``Gemm`` whose second input is an initializer (through a
``DequantizeLinear`` too) and every ``Conv``/``ConvInteger``: the output's elements per sample
times the weight's reduced dimension. Output shapes are read from one onnxruntime run on
the example (those nodes' outputs added as graph outputs): ONNX shape inference loses the
batch axis through a BERT graph's mask arithmetic, a run never does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MATMULS = {"MatMul", "MatMulInteger", "Gemm", "FusedMatMul"}
CONVS = {"Conv", "ConvInteger"}


def weighted_nodes(graph: Any) -> list[tuple[Any, tuple[int, ...]]]:
    """``(node, weight shape)`` of every node that multiplies by a weight."""
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    weights.update({n.output[0]: weights[n.input[0]] for n in graph.node  # static int8's QDQ
                    if n.op_type == "DequantizeLinear" and n.input[0] in weights})
    return [(n, weights[n.input[1]]) for n in graph.node
            if n.op_type in MATMULS | CONVS and len(n.input) > 1 and n.input[1] in weights]


def graph_macs(proto: Any, feed: dict[str, np.ndarray]) -> int:
    """Multiply-accumulates of one pass over ``feed`` (one sample, batch axis first)."""
    import onnx

    from compressflow_export.runtime import make_session

    nodes = weighted_nodes(proto.graph)
    if not nodes:
        return 0
    probed = onnx.ModelProto()
    probed.CopyFrom(proto)
    known = {o.name for o in probed.graph.output}
    for node, _ in nodes:
        if node.output[0] not in known:
            probed.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    names = [o.name for o in probed.graph.output]
    shapes = dict(zip(names, (o.shape for o in make_session(probed.SerializeToString(), 1).run(None, feed))))
    total = 0
    for node, weight in nodes:
        out = shapes[node.output[0]]
        if node.op_type in CONVS:
            total += math.prod(out) * math.prod(weight[1:])
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        total += math.prod(out) * (weight[-1] if transposed else weight[-2])
    return total // max(next(iter(feed.values())).shape[0], 1)
