"""The U-Net stages: DownBlock2D, CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn (and UNetMidBlock2D as
UNet2DConditionModel builds it), UpBlock2D and CrossAttnUpBlock2D, as in diffusers' unet_2d_blocks.py
(NHWC), with one transformer depth per resnet/attention pair."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koala_jax.models.attention import Transformer2DModel
from koala_jax.models.common import ForwardOptions, sow_feature
from koala_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class _Stage(nn.Module):
    """Shared fields of every stage. `depths`: transformer blocks of each layer's attention, one per
    resnet/attention pair (diffusers' per-layer `transformer_layers_per_block`); () means no attention.
    A depth of 0 is an attention with norm and projections but no transformer block, as in diffusers."""

    out_channels: int
    num_layers: int
    depths: tuple[int, ...]
    heads: int
    groups: int
    eps: float
    use_linear_projection: bool
    opts: ForwardOptions

    def resnet(self, i: int) -> nn.Module:
        return self.opts.maybe_remat(ResnetBlock2D, "resnet")(
            self.out_channels, self.groups, self.eps, self.opts, name=f"resnets_{i}"
        )

    def attention(self, i: int, channels: int | None = None) -> nn.Module:
        channels = channels or self.out_channels
        return self.opts.maybe_remat(Transformer2DModel, "attention_block")(
            self.heads,
            channels // self.heads,
            self.depths[i],
            self.groups,
            self.use_linear_projection,
            self.opts,
            name=f"attentions_{i}",
        )

    def stage_output(self, x: jnp.ndarray) -> jnp.ndarray:
        if "stage" in self.opts.capture:
            sow_feature(self, x)
        return x


class DownBlock(_Stage):
    """`num_layers` x (resnet [+ transformer]) then an optional stride-2 downsampler. Returns the
    output and the skip connections (one per layer, plus the downsampled output)."""

    add_downsample: bool = True

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, temb: jnp.ndarray, context: jnp.ndarray
    ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.depths:
                x = self.attention(i)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.opts, name="downsamplers_0")(x)
            skips.append(x)
        return self.stage_output(x), tuple(skips)


class MidBlock(_Stage):
    """UNetMidBlock2DCrossAttn: resnet, then one (transformer, resnet) per entry of `depths`; with no
    depths, UNetMidBlock2D as UNet2DConditionModel builds it (one resnet, no attention: SSD-1B, Vega)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        x = self.resnet(0)(x, temb)
        for i in range(len(self.depths)):
            x = self.attention(i)(x, context)
            x = self.resnet(i + 1)(x, temb)
        return self.stage_output(x)


class UpBlock(_Stage):
    """`num_layers` x (concat a skip, resnet [+ transformer]) then an optional 2x upsampler."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        skips: tuple[jnp.ndarray, ...],
        temb: jnp.ndarray,
        context: jnp.ndarray,
        upsample_size: tuple[int, int] | None = None,
    ) -> jnp.ndarray:
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.depths:
                x = self.attention(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.opts, name="upsamplers_0")(x, upsample_size)
        return self.stage_output(x)
