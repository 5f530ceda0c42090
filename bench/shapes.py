"""Parameter shapes of the benchmark's models, written out from their architectures.

ResNet-50 (He et al. 2016, torchvision layout: conv weights without bias, BatchNorm
weight and bias, bottleneck blocks [3, 4, 6, 3]) and GPT-2 small (Radford et al. 2019,
Hugging Face layout: Conv1D weights stored in x out, tied LM head). Only trainable
parameters count: BatchNorm running statistics are buffers, not optimizer state.
"""

from __future__ import annotations

Shape = tuple[int, ...]


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    """The 161 parameter shapes of ResNet-50 (25,557,032 elements)."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + BN
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = 4 * width  # bottleneck expansion
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:  # projection shortcut
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(num_classes, 2048), (num_classes,)]
    return shapes


def gpt2_small_shapes(vocab: int = 50257, context: int = 1024, d: int = 768, layers: int = 12) -> list[Shape]:
    """The 148 parameter shapes of GPT-2 small (124,439,808 elements)."""
    shapes: list[Shape] = [(vocab, d), (context, d)]  # token and position embeddings
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attention qkv projection
        shapes += [(d, d), (d,)]  # attention output projection
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # MLP up
        shapes += [(4 * d, d), (d,)]  # MLP down
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def numel(shapes: list[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for dim in s:
            n *= dim
        total += n
    return total


# name -> shapes; "tiny" is for smoke tests of the benchmark itself
PARAM_SETS: dict[str, list[Shape]] = {
    "16M": [(16 * 2**20,)],
    "1000x16k": [(16 * 2**10,)] * 1000,
    "resnet50": resnet50_shapes(),
    "gpt2-small": gpt2_small_shapes(),
}
QUICK_PARAM_SETS: dict[str, list[Shape]] = {
    "4M": [(4 * 2**20,)],
    "250x16k": [(16 * 2**10,)] * 250,
}
TINY_PARAM_SETS: dict[str, list[Shape]] = {
    "tiny": [(1000,)] * 10 + [(3, 5), (0,), (1,)],
}
