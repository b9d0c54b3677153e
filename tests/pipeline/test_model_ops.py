"""Arithmetic per image, read from the graph: exact on a hand-sized graph, and ResNet-18's published figure."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexport.pipeline.model_ops import macs_per_image


def test_conv_and_gemm_macs_are_exact(tmp_path):
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((5, 8), np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], [w, fc])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    # conv: 8 x 8 x 8 outputs, 3*3*3 MACs each; gemm: 5 outputs, 8 MACs each
    assert macs_per_image(path) == 8 * 8 * 8 * 27 + 5 * 8


def test_resnet18_matches_its_published_cost(small_run):
    # torchvision lists ResNet-18 at 1.81 GFLOPS (multiply-accumulates) for 224x224; the spatial part scales
    # with the image area, so at 64x64 the count is within a few percent of 1.81e9 * (64/224)^2
    macs = macs_per_image(small_run.file("onnx/model.fp32.onnx"))
    assert abs(macs - 1.814e9 * (64 / 224) ** 2) / macs < 0.05
