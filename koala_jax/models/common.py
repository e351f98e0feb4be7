"""Small pieces every U-Net module shares: dtypes, norms, convs, and feature capture."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from koala_jax.errors import ConfigError
from koala_jax.models.attention_kernels import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q

Dtype = Any

# The collection that `sow_feature` writes to; `UNet2DConditionModel.apply_with_features` reads it.
FEATURES = "features"


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm equivalent on NHWC (statistics in float32, two-pass variance like PyTorch)."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str, eps: float = 1e-5) -> nn.LayerNorm:
    """torch.nn.LayerNorm equivalent over the last axis."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


def conv(
    features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1, padding: int | None = None
) -> nn.Conv:
    """torch.nn.Conv2d(k, stride, padding) equivalent on NHWC; padding defaults to k // 2."""
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def sow_feature(module: nn.Module, value: jnp.ndarray) -> None:
    """Record `value` as this module's output feature for distillation (no-op unless the caller made
    the FEATURES collection mutable, so the default forward pass is unchanged)."""
    module.sow(FEATURES, "output", value, reduce_fn=lambda _, x: x, init_fn=lambda: None)


REMAT_KINDS = ("resnet", "transformer_block", "attention_block")
CAPTURE_KINDS = ("attn1", "attn2", "ff", "resnet", "stage")
ATTENTION_IMPLS = ("xla", "cudnn", "chunked", "flash", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How to compute, as opposed to what (the architecture is `UNetConfig`).

    dtype: compute dtype (e.g. bfloat16); param_dtype: storage dtype of parameters (float32 master
    weights). attention_impl: 'xla' (plain, runs anywhere, holds the score matrices), 'cudnn' (fused
    cuDNN kernel, GPU only, bf16/fp16), 'chunked' (flash attention in plain JAX, any backend), 'flash' /
    'splash' (Pallas TPU kernels), 'auto' (the best for the backend; see models/attention_kernels.py).
    attention_block_q / attention_block_kv: query / key token blocks of 'chunked', 'flash' and 'splash'
    (their memory: block_q x block_kv scores per head). remat: which module kinds to rematerialise in
    the backward pass ('resnet', 'transformer_block', or 'attention_block' = a whole Transformer2DModel),
    with the jax.checkpoint_policies entry `remat_policy`. capture: which features `sow_feature` records
    ('attn1', 'attn2', 'ff', 'resnet', 'stage').
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    attention_block_q: int = DEFAULT_BLOCK_Q
    attention_block_kv: int = DEFAULT_BLOCK_KV
    remat: tuple[str, ...] = ()
    remat_policy: str = "nothing_saveable"
    capture: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choices("remat", self.remat, REMAT_KINDS)
        _check_choices("capture", self.capture, CAPTURE_KINDS)
        _check_choices("attention_impl", (self.attention_impl,), ATTENTION_IMPLS)
        for field in ("attention_block_q", "attention_block_kv"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ConfigError(f"ForwardOptions.{field}: a positive number of tokens, not {getattr(self, field)!r}")
        if not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; see jax.checkpoint_policies")

    def maybe_remat(self, module_cls: type[nn.Module], kind: str) -> type[nn.Module]:
        """`module_cls`, wrapped in nn.remat when `kind` is selected for rematerialisation."""
        if kind not in self.remat:
            return module_cls
        return nn.remat(module_cls, policy=getattr(jax.checkpoint_policies, self.remat_policy))


def _check_choices(field: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for v in values:
        if v not in allowed:
            raise ConfigError(f"ForwardOptions.{field}: unknown value {v!r}; choose from {allowed}")
