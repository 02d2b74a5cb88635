"""What a .tflite file asks of a phone: its operators, and which of them the GPU delegate and
NNAPI would not take (those run on the CPU, often silently, and an int8 model that "runs on the
NPU" is then as slow as the CPU makes it).

- GPU delegate: TFLite's own model analyzer (``tf.lite.experimental.Analyzer`` with
  ``gpu_compatibility=True``), the same checks the delegate makes when it is applied.
- NNAPI: a static check against the NNAPI delegate's operator list and its type rules
  (``tensorflow/lite/delegates/nnapi/nnapi_delegate.cc``, ``Validate``), for Android 11+ (NNAPI 1.3).
  A device's driver may still refuse ops the delegate accepts; NNAPI is deprecated from Android 15,
  where LiteRT's GPU delegate or a vendor NPU delegate is the way to accelerators.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter

# Builtin operators the NNAPI delegate maps to NNAPI operations (Android 11, NNAPI 1.3).
NNAPI_OPS = frozenset(
    """
ABS ADD ARG_MAX ARG_MIN AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND BIDIRECTIONAL_SEQUENCE_LSTM CAST
CONCATENATION CONV_2D DEPTH_TO_SPACE DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP
EXPAND_DIMS FILL FLOOR FULLY_CONNECTED GATHER GREATER GREATER_EQUAL HARD_SWISH HASHTABLE_LOOKUP
L2_NORMALIZATION L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOCAL_RESPONSE_NORMALIZATION LOG LOGICAL_AND
LOGICAL_NOT LOGICAL_OR LOGISTIC LSH_PROJECTION LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG
NOT_EQUAL PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1
RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RNN RSQRT SELECT SELECT_V2 SIN SLICE SOFTMAX
SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF
TANH TILE TOPK_V2 TRANSPOSE TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNIDIRECTIONAL_SEQUENCE_RNN UNPACK
""".split()
)

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def operators(tflite: bytes) -> list[dict]:
    """The operators of the main subgraph in execution order: name, input and output tensor types."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)

    def tensor_types(indices):  # flatbuffers gives 0 for an empty vector; -1 marks an omitted input
        return (
            [types[graph.Tensors(j).Type()] if j >= 0 else None for j in (indices if len(indices) else [])]
            if not isinstance(indices, int)
            else []
        )

    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{code.CustomCode().decode()}"
        ops.append(
            {"op": name, "inputs": tensor_types(op.InputsAsNumpy()), "outputs": tensor_types(op.OutputsAsNumpy())}
        )
    return ops


def gpu_unsupported(tflite: bytes) -> list[dict]:
    """Operators the GPU delegate would leave to the CPU, with the analyzer's reason (needs TensorFlow)."""
    import tensorflow as tf

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_content=tflite, gpu_compatibility=True)
    found, current = [], None
    for line in text.getvalue().splitlines():
        op = re.match(r"\s*Op#(\d+) (\w+)\(", line)
        if op:
            current = (int(op.group(1)), op.group(2))
        if "GPU COMPATIBILITY WARNING:" in line and current and "Subgraph#" not in line:
            found.append(
                {
                    "index": current[0],
                    "op": current[1],
                    "reason": line.split("GPU COMPATIBILITY WARNING:", 1)[1].strip(),
                }
            )
    return found


def nnapi_unsupported(ops: list[dict]) -> list[dict]:
    """Operators NNAPI's delegate would not take on Android 11+, with the reason."""
    found = []
    for index, op in enumerate(ops):
        types = [t for t in op["inputs"] + op["outputs"] if t]
        if op["op"] not in NNAPI_OPS:
            reason = "no NNAPI operation for it"
        elif "INT16" in types:
            reason = "16-bit activations: NNAPI has no int16 kernels"
        elif op["op"] == "CONV_2D" and (len(op["inputs"]) < 3 or op["inputs"][2] is None):
            reason = "convolution without a bias"
        else:
            continue
        found.append({"index": index, "op": op["op"], "reason": reason})
    return found


def notes(ops: list[dict]) -> list[str]:
    """Android-version caveats of the file's arithmetic for NNAPI."""
    out = []
    weighted = [op for op in ops if op["op"] in _WEIGHTED]
    if any(op["inputs"][0] == "FLOAT32" and op["inputs"][1] == "INT8" for op in weighted):
        out.append(
            "dynamic-range (hybrid) kernels: NNAPI takes them from Android 10 (NNAPI 1.2); the GPU delegate "
            "dequantizes the weights to float"
        )
    if any(op["inputs"][0] == "INT8" for op in weighted):
        out.append(
            "signed int8 arithmetic: NNAPI takes it from Android 11 (NNAPI 1.3); on older Android the whole "
            "model runs on the CPU"
        )
    return out


def kernel_stats(tflite: bytes) -> dict:
    """Sparsity and weight sharing as stored in the file: the share of zeros in the CONV_2D and
    FULLY_CONNECTED weight tensors, and the most distinct values any output channel has."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    graph = model.Subgraphs(0)
    dtypes = {
        schema.TensorType.FLOAT32: np.float32,
        schema.TensorType.FLOAT16: np.float16,
        schema.TensorType.INT8: np.int8,
    }
    zeros = total = distinct = 0
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) not in (
            schema.BuiltinOperator.CONV_2D,
            schema.BuiltinOperator.FULLY_CONNECTED,
        ):
            continue
        tensor = graph.Tensors(op.Inputs(1))
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        if (
            not isinstance(data, np.ndarray) or tensor.Type() not in dtypes
        ):  # computed at run time (float16 dequantized)
            continue
        weights = data.view(dtypes[tensor.Type()]).reshape(tensor.ShapeAsNumpy()[0], -1)
        zeros += int((weights == 0).sum())
        total += weights.size
        distinct = max(distinct, max(len(np.unique(row)) for row in weights))
    return {"zero_fraction": zeros / total if total else 0.0, "max_distinct": distinct}


def op_report(tflite: bytes) -> dict:
    """Everything above, for the export report: op counts, GPU and NNAPI gaps, notes."""
    ops = operators(tflite)
    return {
        "ops": dict(Counter(op["op"] for op in ops)),
        "gpu_unsupported": gpu_unsupported(tflite),
        "nnapi_unsupported": nnapi_unsupported(ops),
        "notes": notes(ops),
    }
