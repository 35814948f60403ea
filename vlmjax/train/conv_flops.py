"""Analytic forward FLOPs of the convolutional image towers with stages of differing shapes:
CLIP's ResNet (models/resnet.py) and EfficientNet (models/efficientnet.py).

The convention of vlmjax.train.flops: 2 FLOPs per multiply-add of the convolutions and dense
layers (attention pool projections, scores and values; squeeze-and-excitation); norms,
activations and pooling are ignored. The towers' own modules give the shapes (block specs,
widths), so a change to a tower's layout cannot leave its count behind silently.
"""
from __future__ import annotations

from vlmjax.models import efficientnet as efficientnet_lib
from vlmjax.models import resnet as resnet_lib


def conv_flops(side_out: int, kernel: int, channels_in: int, channels_out: int,
               groups: int = 1) -> float:
    return 2.0 * side_out * side_out * kernel * kernel * (channels_in // groups) * channels_out


def resnet_flops(cfg: dict, image_size: int) -> float:
    net = resnet_lib.ResNet(**{**cfg, "image_size": image_size})
    half, side = net.width // 2, image_size // 2
    flops = conv_flops(side, 3, 3, half)  # stride-2 stem conv
    flops += conv_flops(side, 3, half, half) + conv_flops(side, 3, half, net.width)
    side //= 2  # the stem's 2x2 average pool
    channels = net.width
    for stage, blocks in enumerate(net.layers):
        planes = net.width * 2 ** stage
        out = planes * resnet_lib.BLOCK_EXPANSION
        for j in range(blocks):
            stride = 2 if stage > 0 and j == 0 else 1
            flops += conv_flops(side, 1, channels, planes) + conv_flops(side, 3, planes, planes)
            side //= stride  # the anti-aliasing pool sits before conv3 and the shortcut conv
            flops += conv_flops(side, 1, planes, out)
            if stride > 1 or channels != out:
                flops += conv_flops(side, 1, channels, out)
            channels = out
    tokens, dim = side * side + 1, net.embed_width
    # keys and values for every token; one query (the mean token); scores, values, output.
    flops += 2 * tokens * 2 * dim * dim + 2 * dim * dim + 2 * 2 * tokens * dim
    return flops + 2 * dim * net.output_dim


def _side_out(side: int, kernel: int, stride: int, padding) -> int:
    (lo, hi), _ = padding
    return (side + lo + hi - kernel) // stride + 1


def efficientnet_flops(cfg: dict, image_size: int) -> float:
    net = efficientnet_lib.EfficientNet(**cfg)
    stem = net.filters(efficientnet_lib.STEM_CHANNELS)
    side = _side_out(image_size, 3, 2, ((0, 1), (0, 1)))
    flops = conv_flops(side, 3, 3, stem)
    for spec in net.blocks():
        width = spec.in_dim * spec.expand_ratio
        if spec.expand_ratio != 1:
            flops += conv_flops(side, 1, spec.in_dim, width)
        pad = efficientnet_lib.depthwise_padding(spec.kernel, spec.stride, spec.adjust_padding)
        side = _side_out(side, spec.kernel, spec.stride, pad)
        flops += conv_flops(side, spec.kernel, width, width, groups=width)
        squeezed = max(1, int(spec.in_dim * net.squeeze_expansion_ratio))
        flops += 2 * 2 * width * squeezed  # squeeze-and-excitation on the pooled vector
        flops += conv_flops(side, 1, width, spec.out_dim)
    return flops
