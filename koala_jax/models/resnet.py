"""ResnetBlock2D, Downsample2D and Upsample2D, as in diffusers' resnet.py / (down|up)sampling.py, on NHWC."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koala_jax.models.common import ForwardOptions, conv, group_norm, sow_feature


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between and a 1x1 shortcut when the
    channel count changes ("default" time scale shift, output scale 1, as SDXL). Without a time embedding
    (`temb` None: the VAE's blocks, diffusers' temb_channels=None) there is no `time_emb_proj`."""

    out_channels: int
    groups: int
    eps: float
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None) -> jnp.ndarray:
        o = self.opts
        h = nn.silu(group_norm(self.groups, self.eps, o.dtype, o.param_dtype, "norm1")(x))
        h = conv(self.out_channels, 3, o.dtype, o.param_dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=o.dtype, param_dtype=o.param_dtype, name="time_emb_proj")(
                nn.silu(temb)
            )
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, o.dtype, o.param_dtype, "norm2")(h))
        h = conv(self.out_channels, 3, o.dtype, o.param_dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, o.dtype, o.param_dtype, "conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        if "resnet" in o.capture:
            sow_feature(self, out)
        return out


class Downsample2D(nn.Module):
    """3x3 conv with stride 2 and padding 1 (diffusers' `downsamplers.0.conv`). With padding 0 (the VAE's
    encoder) diffusers pads one zero row and column at the bottom and right, then convolves unpadded."""

    channels: int
    opts: ForwardOptions
    padding: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, self.opts.dtype, self.opts.param_dtype, "conv", 2, self.padding)(x)


def nearest_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """torch F.interpolate(mode='nearest', size=size) on NHWC: source index floor(dst * in / out)."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        idx = jnp.minimum(jnp.floor(jnp.arange(out, dtype=jnp.float32) * (n / out)).astype(jnp.int32), n - 1)
        x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to `output_size` when the latent is not a multiple of the U-Net's
    overall stride), then a 3x3 conv (diffusers' `upsamplers.0.conv`)."""

    channels: int
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray, output_size: tuple[int, int] | None = None) -> jnp.ndarray:
        b, h, w, c = x.shape
        if output_size is None:
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        else:
            x = nearest_resize(x, output_size)
        return conv(self.channels, 3, self.opts.dtype, self.opts.param_dtype, "conv")(x)
