"""Export a checkpoint for people without segnet_ext: the same weights in the plain-PyTorch
backend, as TorchScript or ONNX; or, for segnet itself, as a small float16 weights file."""
from pathlib import Path
from typing import Tuple, Union

import torch

from .checkpoint import load_checkpoint, load_model, save_checkpoint, weights_only_checkpoint

FORMATS = ("torchscript", "onnx", "fp16")


def export(
    checkpoint: Union[str, Path],
    output: Union[str, Path],
    format: str = "torchscript",
    size: Tuple[int, int] = (360, 480),
    trust: bool = False,
) -> Path:
    """Write the model of ``checkpoint`` to ``output``, traced at input size ``size``
    (H, W): the exported graph takes [N, 3, H, W] images of that size, any batch N.
    ``fp16``: the weights in float16 without the optimiser state, for eval and predict."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "fp16":
        return save_checkpoint(weights_only_checkpoint(load_checkpoint(checkpoint, trust=trust)), output)
    model, _ = load_model(checkpoint, torch.device("cpu"), backend="torch", trust=trust)
    model.to(memory_format=torch.contiguous_format)
    example = torch.randn(1, model.in_channels, *size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = model(example)
        if format == "torchscript":
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(output))
            got = torch.jit.load(str(output))(example)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                raise RuntimeError("the exported TorchScript model does not reproduce the checkpoint's outputs")
        else:
            _export_onnx(model, example, output)
    return output


def _export_onnx(model, example, output: Path) -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package: pip install onnx onnxscript") from None
    torch.onnx.export(
        model, (example,), str(output), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
