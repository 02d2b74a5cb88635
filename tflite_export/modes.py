"""The export modes and formats: one table each, checked before any work starts.

A mode is "what happens to the weights": optional fine-tuning with tensorflow-model-optimization
(``compress``: pruning, clustering, quantization-aware training, in that order), then the TFLite
converter's quantization (``quantize``). A format is the file that comes out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """One export mode.

    Attributes:
        name: the name on the command line.
        description: one line for the help text and the report.
        quantize: the converter's quantization: None (float32), "float16", "dynamic", "int8"
            (full integer) or "int16x8" (16-bit activations, 8-bit weights).
        compress: tensorflow-model-optimization steps run before conversion, each fine-tuning the
            model on the run's training split: "prune", "cluster", "qat".
    """

    name: str
    description: str
    quantize: str | None = None
    compress: tuple[str, ...] = ()

    @property
    def integer(self) -> bool:
        """Full-integer int8: the modes that ``int8_io`` applies to."""
        return self.quantize == "int8"

    @property
    def needs_calibration(self) -> bool:
        return self.quantize in ("int8", "int16x8")

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats this mode can be written as.

        ONNX takes float models and every int8 mode as QuantizeLinear/DequantizeLinear pairs with
        symmetric int8 scales, which TensorRT builds into an INT8 engine: post-training int8 is
        calibrated by onnxruntime's static quantization, and the quantization-aware modes keep the
        ranges they learned (made symmetric; see :func:`tflite_export.onnx_export.qat_to_qdq`).
        float16 is left to TensorRT (``--fp16``); dynamic range and 16x8 have no TensorRT form.
        """
        if self.quantize is None:
            return tuple(FORMATS)
        if self.quantize == "int8":
            return ("tflite", "onnx")
        return ("tflite",)


MODES = {
    m.name: m
    for m in (
        Mode("float32", "no quantization: the Keras model's float32 weights and arithmetic"),
        Mode(
            "float16",
            "float16 weights (half the size), float32 arithmetic on CPU; GPUs run float16",
            quantize="float16",
        ),
        Mode(
            "dynamic",
            "dynamic range: int8 weights, activations quantized on the fly (no calibration)",
            quantize="dynamic",
        ),
        Mode("int8", "full integer int8, calibrated on a sample of the training images", quantize="int8"),
        Mode(
            "int16x8",
            "16-bit activations, 8-bit weights, calibrated: closer to float32 than int8, CPU only",
            quantize="int16x8",
        ),
        Mode("qat", "quantization-aware fine-tuning, then full integer int8", quantize="int8", compress=("qat",)),
        Mode(
            "prune",
            "magnitude pruning (polynomial schedule to --sparsity), stripped; float32 file",
            compress=("prune",),
        ),
        Mode("cluster", "weight clustering (--clusters shared values per layer); float32 file", compress=("cluster",)),
        Mode(
            "prune-qat",
            "pruning, then sparsity-preserving quantization-aware training; int8",
            quantize="int8",
            compress=("prune", "qat"),
        ),
        Mode(
            "cluster-qat",
            "clustering, then cluster-preserving quantization-aware training; int8",
            quantize="int8",
            compress=("cluster", "qat"),
        ),
        Mode(
            "prune-cluster-int8",
            "pruning, sparsity-preserving clustering, then full integer int8 (Deep Compression's recipe)",
            quantize="int8",
            compress=("prune", "cluster"),
        ),
    )
}

# format -> file suffix (a SavedModel is a folder)
FORMATS = {"tflite": ".tflite", "onnx": ".onnx", "saved_model": ".saved_model"}


def get_mode(name: str) -> Mode:
    """The mode called ``name``; a ValueError lists the valid ones."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"mode={name!r} is not an export mode; use one of {', '.join(MODES)}.") from None


def check_format(mode: Mode, fmt: str) -> str:
    """Raises a ValueError (with the alternative) when ``mode`` cannot be written as ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {', '.join(FORMATS)}.")
    if fmt not in mode.formats:
        raise ValueError(
            f"mode={mode.name!r} can be written as {' or '.join(mode.formats)}, not {fmt}. For TensorRT, export "
            f"--format onnx with float32 (TensorRT builds FP16 itself with --fp16) or int8 (an INT8 engine from "
            f"calibrated scales); see the README, 'Exporting to a phone or a Jetson'."
        )
    return fmt
