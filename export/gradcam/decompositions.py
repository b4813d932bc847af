"""Backward ops rewritten with forward ops, so a traced Grad-CAM graph exports to plain ONNX.

The ONNX exporter has no translation for several aten backward ops that autograd emits while
tracing Grad-CAM (`convolution_backward`, the average-pool backwards, `max_pool3d` backward;
`silu_backward` / `mish_backward` survive as single ops). Each replacement here computes the same
gradient with ops that map onto standard ONNX operators: a transposed convolution, a constant
pooling matrix applied with MatMul, a scatter-add. Two forward ops are replaced too:
`_adaptive_avg_pool3d` (no translation) and non-overlapping max-pool with indices (ONNX Runtime's
MaxPool with an Indices output is slow). `gradcam_decompositions()` is the table handed to
`make_fx` together with PyTorch's own core decompositions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._decomp import core_aten_decompositions, decomposition_table

aten = torch.ops.aten

_NO_WEIGHT_GRAD = (
    "Grad-CAM tracing asked for a weight or bias gradient; the explainer freezes every parameter "
    "while tracing, so this should not happen"
)


def _ints(values: Sequence[Any], n: int) -> list[int]:
    """A per-dimension list of `n` python ints from a pooling/conv argument (1 value broadcasts)."""
    out = [int(v) for v in values]
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise ValueError(f"expected {n} values, got {values}")
    return out


def conv_input_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """The gradient of a convolution with respect to its input, as a convolution of the gradient.

    A convolution's input gradient is the transposed convolution of the output gradient with the
    same weights (and the other way round). The output padding recovers input rows the forward
    stride skipped.
    """
    n = input.dim() - 2
    stride_, padding_, dilation_ = _ints(stride, n), _ints(padding, n), _ints(dilation, n)
    if transposed:
        return aten.convolution(
            grad_output, weight, None, stride_, padding_, dilation_, False, [0] * n, groups
        )
    kernel = [int(k) for k in weight.shape[2:]]
    extra = []
    for i in range(n):
        covered = (
            (int(grad_output.shape[2 + i]) - 1) * stride_[i]
            - 2 * padding_[i]
            + dilation_[i] * (kernel[i] - 1)
            + 1
        )
        extra.append(int(input.shape[2 + i]) - covered)
    return aten.convolution(
        grad_output, weight, None, stride_, padding_, dilation_, True, extra, groups
    )


def convolution_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`aten.convolution_backward` for the input gradient only (Grad-CAM freezes the weights)."""
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError(_NO_WEIGHT_GRAD)
    grad_input = None
    if output_mask[0]:
        grad_input = conv_input_grad(
            grad_output,
            input,
            weight,
            stride,
            padding,
            dilation,
            transposed,
            output_padding,
            groups,
        )
    return grad_input, None, None


def avg_pool_matrix(
    size: int,
    kernel: int,
    stride: int,
    padding: int,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """The [out, in] matrix P with avg_pool1d(x) == x @ P.T, PyTorch's divisor rules included.

    Average pooling over several dimensions is separable: its divisor is a product of one count
    per dimension, so an N-d pool is one such matrix per dimension. With `divisor_override` the
    entries are 0/1 and the caller divides once.
    """
    out = pool_output_size(size, kernel, stride, padding, 1, ceil_mode)
    rows = []
    for o in range(out):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        padded_count = end - start
        start, end = max(start, 0), min(end, size)
        row = [0.0] * size
        if divisor_override is not None:
            value = 1.0
        else:
            value = 1.0 / (padded_count if count_include_pad else end - start)
        for i in range(start, end):
            row[i] = value
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def adaptive_avg_pool_matrix(size: int, out: int) -> torch.Tensor:
    """The [out, in] matrix P with adaptive_avg_pool1d(x, out) == x @ P.T."""
    rows = []
    for o in range(out):
        start = (o * size) // out
        end = -(-((o + 1) * size) // out)
        row = [0.0] * size
        for i in range(start, end):
            row[i] = 1.0 / (end - start)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def apply_along_last_dims(tensor: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Map the last len(matrices) dims of `tensor` by M_i ([new_i, old_i]): t_i <- M_i t_i.

    With the pooling matrices P_i this is a separable pool (forward); with P_i^T its backward.
    """
    n = len(matrices)
    for j, matrix in enumerate(matrices):
        matrix = matrix.to(tensor.dtype)
        axis = j - n
        if axis == -1:
            tensor = torch.matmul(tensor, matrix.t())
        elif axis == -2:
            tensor = torch.matmul(matrix, tensor)
        else:
            tensor = torch.matmul(tensor.movedim(axis, -1), matrix.t()).movedim(-1, axis)
    return tensor


def apply_separable(grad: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The backward of a separable pool with matrices P_i ([out_i, in_i]): dx = P^T dy per dim."""
    return apply_along_last_dims(grad, [matrix.t() for matrix in matrices])


def _avg_pool_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    *,
    n: int,
) -> torch.Tensor:
    kernel = _ints(kernel_size, n)
    stride_ = _ints(stride, n) if len(stride) else kernel
    padding_ = _ints(padding, n)
    sizes = [int(s) for s in input.shape[-n:]]
    matrices = [
        avg_pool_matrix(
            sizes[i],
            kernel[i],
            stride_[i],
            padding_[i],
            ceil_mode,
            count_include_pad,
            divisor_override,
        )
        for i in range(n)
    ]
    for i, matrix in enumerate(matrices):
        if matrix.shape[0] != int(grad_output.shape[-n + i]):
            raise ValueError(
                f"avg-pool backward: computed {matrix.shape[0]} outputs in dim {i}, "
                f"the gradient has {int(grad_output.shape[-n + i])}"
            )
    grad = apply_separable(grad_output, matrices)
    if divisor_override is not None:
        grad = grad / float(divisor_override)
    return grad


def avg_pool2d_backward(*args: Any) -> torch.Tensor:
    """`aten.avg_pool2d_backward` as two constant pooling matrices applied with MatMul.

    Arguments as the aten op: grad_output, input, kernel_size, stride, padding, ceil_mode,
    count_include_pad, divisor_override.
    """
    return _avg_pool_backward(*args, n=2)


def avg_pool3d_backward(*args: Any) -> torch.Tensor:
    """`aten.avg_pool3d_backward` (also behind LocalResponseNorm) as three pooling matrices."""
    return _avg_pool_backward(*args, n=3)


def _adaptive_avg_pool_backward(
    grad_output: torch.Tensor, input: torch.Tensor, n: int
) -> torch.Tensor:
    sizes = [int(s) for s in input.shape[-n:]]
    outs = [int(s) for s in grad_output.shape[-n:]]
    matrices = [adaptive_avg_pool_matrix(s, o) for s, o in zip(sizes, outs, strict=True)]
    return apply_separable(grad_output, matrices)


def adaptive_avg_pool3d(input: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
    """`aten._adaptive_avg_pool3d` (no ONNX translation): a mean, or constant pooling matrices."""
    sizes = [int(s) for s in input.shape[-3:]]
    outs = _ints(output_size, 3)
    if all(o == 1 for o in outs):
        return input.mean(dim=(-3, -2, -1), keepdim=True)
    matrices = [adaptive_avg_pool_matrix(s, o) for s, o in zip(sizes, outs, strict=True)]
    return apply_along_last_dims(input, matrices)


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """`aten._adaptive_avg_pool2d_backward` as constant pooling matrices (any output size)."""
    return _adaptive_avg_pool_backward(grad_output, input, 2)


def adaptive_avg_pool3d_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """`aten._adaptive_avg_pool3d_backward` as constant pooling matrices (any output size)."""
    return _adaptive_avg_pool_backward(grad_output, input, 3)


def pool_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """PyTorch's pooling output size (a ceil-mode window must start inside the input or padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _max_pool_with_indices(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    n: int,
) -> Any:
    kernel = _ints(kernel_size, n)
    stride_ = _ints(stride, n) if len(stride) else kernel
    if stride_ != kernel or any(_ints(padding, n)) or any(d != 1 for d in _ints(dilation, n)):
        return NotImplemented  # overlapping or padded windows: ONNX MaxPool with Indices
    sizes = [int(s) for s in input.shape[-n:]]
    outs = [pool_output_size(sizes[i], kernel[i], kernel[i], 0, 1, ceil_mode) for i in range(n)]
    if any(o * k > s for o, k, s in zip(outs, kernel, sizes, strict=True)):
        return NotImplemented  # a ceil-mode window hangs over the edge
    # Non-overlapping windows: a reshape, a transpose and a max over each window's elements.
    x = input
    for i in range(n):
        if outs[i] * kernel[i] != sizes[i]:
            x = x.narrow(2 + i, 0, outs[i] * kernel[i])
    split = [d for o, k in zip(outs, kernel, strict=True) for d in (o, k)]
    order = [0, 1, *(2 + 2 * i for i in range(n)), *(3 + 2 * i for i in range(n))]
    windows = x.reshape(*input.shape[:2], *split).permute(order)
    windows = windows.reshape(*input.shape[:2], *outs, math.prod(kernel))
    values, position = windows.max(dim=-1)  # the first of tied maxima, as PyTorch's CPU kernel
    # Flat input index (PyTorch's format): window corner + offset of the element in the window,
    # the offset read from a small table (integer Mod/Div cost ORT more than the pooling).
    corner = torch.zeros(outs, dtype=torch.int64)
    offset = torch.zeros(kernel, dtype=torch.int64)
    step = 1
    for i in reversed(range(n)):
        shape = [1] * n
        shape[i] = outs[i]
        corner = corner + (torch.arange(outs[i]) * kernel[i] * step).view(shape)
        shape[i] = kernel[i]
        offset = offset + (torch.arange(kernel[i]) * step).view(shape)
        step *= sizes[i]
    offset = offset.flatten().index_select(0, position.flatten()).view(position.shape)
    return values, corner + offset


def max_pool2d_with_indices(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> Any:
    """`aten.max_pool2d_with_indices` for non-overlapping windows as reshape + max/argmax.

    ONNX Runtime's MaxPool with an Indices output takes a slow path (over half the time of the
    mnist_cnn explainer). Other windows return NotImplemented and keep the MaxPool.
    """
    return _max_pool_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode, 2)


def max_pool3d_with_indices(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> Any:
    """`aten.max_pool3d_with_indices` for non-overlapping windows as reshape + max/argmax."""
    return _max_pool_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode, 3)


def max_pool_backward_scatter(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """Max-pool backward routed by the forward's argmax indices (flat per channel), scatter-add.

    Indices, not an equality mask: MNIST's flat background has thousands of tied maxima.
    Overlapping windows that pick the same input add up, as in PyTorch.
    """
    flat_grad = grad_output.flatten(2)
    zeros = input.new_zeros((*input.shape[:2], math.prod(int(s) for s in input.shape[2:])))
    return zeros.scatter_add(2, indices.flatten(2), flat_grad).view(input.shape)


def max_pool3d_with_indices_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """`aten.max_pool3d_with_indices_backward` as a scatter-add over the saved indices."""
    return max_pool_backward_scatter(grad_output, input, indices)


def silu_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """d silu(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    sig = torch.sigmoid(input)
    return grad_output * sig * (1 + input * (1 - sig))


def mish_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """d mish(x) = tanh(softplus(x)) + x * sigmoid(x) * (1 - tanh(softplus(x))^2)."""
    tanh_sp = torch.tanh(torch.nn.functional.softplus(input))
    return grad_output * (tanh_sp + input * torch.sigmoid(input) * (1 - tanh_sp * tanh_sp))


REPLACEMENTS: dict[Any, Callable[..., Any]] = {
    aten.convolution_backward.default: convolution_backward,
    aten.avg_pool2d_backward.default: avg_pool2d_backward,
    aten.avg_pool3d_backward.default: avg_pool3d_backward,
    aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward,
    aten._adaptive_avg_pool3d_backward.default: adaptive_avg_pool3d_backward,
    aten.max_pool3d_with_indices_backward.default: max_pool3d_with_indices_backward,
    aten._adaptive_avg_pool3d.default: adaptive_avg_pool3d,
    aten.max_pool2d_with_indices.default: max_pool2d_with_indices,
    aten.max_pool3d_with_indices.default: max_pool3d_with_indices,
    aten.silu_backward.default: silu_backward,
    aten.mish_backward.default: mish_backward,
}


def gradcam_decompositions() -> dict[Any, Callable[..., Any]]:
    """PyTorch's core decompositions, its 2-D max-pool backward, and the replacements above."""
    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    table[aten.max_pool2d_with_indices_backward.default] = decomposition_table[
        aten.max_pool2d_with_indices_backward.default
    ]
    table.update(REPLACEMENTS)
    return table
