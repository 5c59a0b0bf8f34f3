"""What every modality encoder shares: the error type, the preprocessor and trunk interfaces.

Every modality goes through the same stages (ImageBind-style):

    raw tensor --Preprocessor--> model input --Trunk--> [n, trunk.out_dim] --head--> token

A Preprocessor is a plain callable without parameters: it checks the raw input loudly (dtype,
shape, sample rate) and turns it into what the trunk expects. A Trunk is an nn.Module that maps
that input to one feature vector per row and says how wide it is (`out_dim`).

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ModelConfigError(ValueError):
    """A model configuration is invalid. The message names the field and what to change."""


@dataclass(frozen=True)
class RawInfo:
    """Facts about the raw inputs that are not in the tensors themselves (same for every row)."""

    audio_sample_rate: int


class Preprocessor(Protocol):
    """Raw window tensor of one modality (all rows that have it) -> trunk input. No parameters."""

    def __call__(self, raw: Tensor, info: RawInfo) -> Tensor: ...


class Trunk(nn.Module):
    """A modality backbone: preprocessed input [n, ...] -> features [n, out_dim]."""

    out_dim: int


def require(condition: bool, message: str) -> None:
    """Raise ModelConfigError(message) unless condition holds (for config __post_init__ checks)."""
    if not condition:
        raise ModelConfigError(message)


def check_hf_fields(
    section: str, trunk: str, path: str | None, config: dict[str, Any] | None
) -> None:
    """The trunk/hf_path/hf_config fields of a modality config are consistent."""
    require(trunk in ("cnn", "hf"), f'{section}.trunk must be "cnn" or "hf", got {trunk!r}')
    if trunk == "hf":
        require(
            path is not None or config is not None,
            f'{section}.trunk="hf" needs {section}.hf_path: a local transformers model '
            f"directory (nothing is downloaded)",
        )
    else:
        require(
            path is None and config is None,
            f'{section}.hf_path/hf_config are only used with {section}.trunk="hf"',
        )


def check_raw(raw: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Refuse a raw batch whose dtype or per-row shape is not what the model was built for."""
    if raw.dtype != dtype:
        raise ValueError(
            f"{name}: expected dtype {dtype}, got {raw.dtype}; convert the raw "
            f"input before collating (the pipeline builds {dtype} arrays)"
        )
    if raw.dim() != len(shape) + 1 or tuple(raw.shape[1:]) != shape:
        raise ValueError(
            f"{name}: expected rows of shape {list(shape)} (batch "
            f"[n, {', '.join(map(str, shape))}]), got batch {list(raw.shape)}; "
            f"the model config fixes this shape"
        )


ConvNorm = Literal["batch", "group"]  # the normalisation of every ConvBlock (a model switch)


class ConvBlock(nn.Sequential):
    """Conv (optionally depthwise-separable) + BatchNorm + GELU, 1D or 2D (the norm can be
    swapped for GroupNorm afterwards: `use_group_norm`)."""

    def __init__(self, c_in: int, c_out: int, stride: int, separable: bool, dims: int = 2):
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        if separable:
            layers: list[nn.Module] = [
                conv(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),  # depthwise: size/stride
                conv(c_in, c_out, 1, bias=False),  # pointwise: c_in -> c_out channels
            ]
        else:
            layers = [conv(c_in, c_out, 3, stride, 1, bias=False)]  # c_in -> c_out, size/stride
        super().__init__(*layers, norm(c_out), nn.GELU())


def fold_batchnorm(module: nn.Module) -> int:
    """Inference only: merge each ConvBlock's BatchNorm into the convolution before it.

    In eval mode a BatchNorm is a fixed affine map per channel, so conv -> BN is one
    convolution with a bias: the same outputs up to float rounding, one pass fewer over the
    block's output. The module must be in eval mode and is not to be trained (or saved)
    afterwards. Returns how many blocks were folded."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (call .eval() first)")
    folded = 0
    for block in module.modules():
        if isinstance(block, ConvBlock) and isinstance(block[-2], nn.modules.batchnorm._BatchNorm):
            block[-3] = fuse_conv_bn_eval(block[-3], block[-2])
            del block[-2]  # [..., conv, BN, GELU] -> [..., conv (with bias), GELU]
            folded += 1
    return folded


class FrozenBatchNorm(nn.Module):
    """A BatchNorm whose statistics stay what they were: each example is normalised with
    the running mean and variance, never with its batch's, in training too, so it is a
    per-channel affine map of one example alone (what DP-SGD needs). The scale and shift
    still train. Its state dict is the BatchNorm's: a model saved with it loads back into
    BatchNorms, and computes the same in eval mode."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("FrozenBatchNorm needs a BatchNorm that tracks running statistics")
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.running_mean: Tensor
        self.running_var: Tensor
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(  # [B, C, ...] -> [B, C, ...]
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace each ConvBlock's BatchNorm with a FrozenBatchNorm of its statistics: how a
    trained model (the shipped one, trained with BatchNorm) is fine-tuned with DP-SGD.
    Returns how many blocks changed."""
    frozen = 0
    for block in module.modules():
        if isinstance(block, ConvBlock) and isinstance(block[-2], nn.modules.batchnorm._BatchNorm):
            block[-2] = FrozenBatchNorm(block[-2])
            frozen += 1
    return frozen


def use_group_norm(module: nn.Module) -> int:
    """Replace each ConvBlock's BatchNorm with a GroupNorm of one group over the same channels.

    BatchNorm normalises every example with statistics of the whole batch, so one
    example's gradient depends on the others: DP-SGD, which bounds each example's
    gradient on its own, cannot use it (Opacus refuses it), nor can per-example gradients
    with torch.func. GroupNorm normalises each example alone. One group (each example's
    block output over all its channels and positions, with a scale and shift per channel)
    keeps what tells channels apart -- a frame that is redder overall -- which
    GroupNorm with several groups subtracts away with each group's mean: with 8 groups
    (per channel, in the tiny test model) a task coded in colour was not learnt at all
    (tests/test_privacy.py). Called on a freshly built model (the weights are new);
    returns how many blocks changed."""
    swapped = 0
    for block in module.modules():
        if isinstance(block, ConvBlock) and isinstance(block[-2], nn.modules.batchnorm._BatchNorm):
            block[-2] = nn.GroupNorm(1, block[-2].num_features)
            swapped += 1
    return swapped
