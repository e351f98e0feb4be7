"""AutoencoderKL (SDXL's VAE), as diffusers' autoencoder_kl.py and autoencoders/vae.py: Encoder and Decoder
of DownEncoderBlock2D / UpDecoderBlock2D stages around a UNetMidBlock2D with one self-attention, plus the
1x1 quant_conv / post_quant_conv.

Inputs and outputs are NCHW as in diffusers; inside, NHWC. Parameter paths read like diffusers keys with
`.N` written `_N` (`decoder/up_blocks_0/resnets_2/conv1/kernel`), so `weights.state_dict` maps them with
diffusers' naming. The residual blocks and resamplers are the U-Net's (`resnet.py`) without a time
embedding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from koala_jax.models.attention_kernels import dot_product_attention
from koala_jax.models.common import ForwardOptions, conv, group_norm
from koala_jax.models.config import UnsupportedConfigError
from koala_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

# diffusers fields accepted only at their default (they select variants SDXL's VAE does not use).
_FIXED_FIELDS: dict[str, Any] = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
_IGNORED_FIELDS = ("sample_size",)  # Only sizes diffusers' tiled decoding.
EPS = 1e-6  # diffusers hard-codes the VAE's norm epsilon.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` architecture; field names and defaults as in its config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # Whether diffusers runs this VAE in float32 when the rest is float16 (SDXL's overflows in float16).
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if len(types) != n:
                raise UnsupportedConfigError(f"config field {name!r} needs {n} entries, got {list(types)}")
            if any(t != allowed for t in types):
                raise UnsupportedConfigError(f"config field {name!r}: only {allowed!r} is supported, got {list(types)}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise UnsupportedConfigError(
                    f"config field 'norm_num_groups': {self.norm_num_groups} does not divide {ch}"
                )

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (diffusers' vae_scale_factor, 8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        """Parse a diffusers `AutoencoderKL` config dict; refuse fields we do not implement, by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IGNORED_FIELDS}
        for key, value in given.items():
            if key in _FIXED_FIELDS:
                if value != _FIXED_FIELDS[key]:
                    raise UnsupportedConfigError(
                        f"config field {key!r} = {value!r} is not supported (only {_FIXED_FIELDS[key]!r})"
                    )
            elif key not in fields:
                raise UnsupportedConfigError(f"unknown config field {key!r} = {value!r}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in fields}
        return cls(**kwargs)


class VAEAttention(nn.Module):
    """The mid block's self-attention over all H*W positions: GroupNorm, `to_q`/`to_k`/`to_v` and `to_out.0`
    (all with bias), one head of all channels (diffusers sets attention_head_dim to the channel count), and
    the input added back."""

    groups: int
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        o = self.opts
        b, h, w, c = x.shape
        hidden = group_norm(self.groups, EPS, o.dtype, o.param_dtype, "group_norm")(x).reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        q, k, v = (dense(name)(hidden).reshape(b, h * w, 1, c) for name in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v, o.attention_impl, o.attention_block_q, o.attention_block_kv)
        out = out.reshape(b, h * w, c)
        return dense("to_out_0")(out).reshape(b, h, w, c) + x.astype(o.dtype)


class UNetMidBlock2D(nn.Module):
    """resnet, attention (unless mid_block_add_attention is off), resnet, at constant width."""

    channels: int
    groups: int
    add_attention: bool
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        resnet = lambda i: ResnetBlock2D(self.channels, self.groups, EPS, self.opts, name=f"resnets_{i}")
        x = resnet(0)(x, None)
        if self.add_attention:
            x = VAEAttention(self.groups, self.opts, name="attentions_0")(x)
        return resnet(1)(x, None)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (except in the last stage) a stride-2 conv on the bottom/right-padded input."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, self.opts, name=f"resnets_{i}")(x, None)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.opts, padding=0, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (except in the last stage) nearest 2x upsampling and a 3x3 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, self.opts, name=f"resnets_{i}")(x, None)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.opts, name="upsamplers_0")(x)
        return x


def _conv_out(x: jnp.ndarray, features: int, groups: int, opts: ForwardOptions) -> jnp.ndarray:
    """conv_norm_out -> SiLU -> conv_out, the head of both encoder and decoder."""
    x = nn.silu(group_norm(groups, EPS, opts.dtype, opts.param_dtype, "conv_norm_out")(x))
    return conv(features, 3, opts.dtype, opts.param_dtype, "conv_out")(x)


class Encoder(nn.Module):
    """Pixels (NHWC) -> the posterior's mean and log-variance, concatenated on channels (double_z)."""

    config: VAEConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, o = self.config, self.opts
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, o.dtype, o.param_dtype, "conv_in")(x)
        for i, channels in enumerate(cfg.block_out_channels):
            block = DownEncoderBlock2D(
                channels, cfg.layers_per_block, cfg.norm_num_groups, i < n - 1, o, name=f"down_blocks_{i}"
            )
            x = block(x)
        x = UNetMidBlock2D(
            cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, o, name="mid_block"
        )(x)
        return _conv_out(x, 2 * cfg.latent_channels, cfg.norm_num_groups, o)


class Decoder(nn.Module):
    """Latents (NHWC) -> pixels: the encoder's stages mirrored, one more resnet per stage."""

    config: VAEConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        cfg, o = self.config, self.opts
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[-1], 3, o.dtype, o.param_dtype, "conv_in")(z)
        x = UNetMidBlock2D(
            cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, o, name="mid_block"
        )(x)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            block = UpDecoderBlock2D(
                channels, cfg.layers_per_block + 1, cfg.norm_num_groups, i < n - 1, o, name=f"up_blocks_{i}"
            )
            x = block(x)
        return _conv_out(x, cfg.out_channels, cfg.norm_num_groups, o)


class AutoencoderKL(nn.Module):
    """The VAE. `encode` gives the posterior (mean, log-variance), `decode` the image of a latent; `latents`
    and `images` add SDXL's scaling factor, the convention of the U-Net's latent space."""

    config: VAEConfig
    opts: ForwardOptions = ForwardOptions()

    def setup(self) -> None:
        cfg, o = self.config, self.opts
        self.encoder = Encoder(cfg, o, name="encoder")
        self.decoder = Decoder(cfg, o, name="decoder")
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, o.dtype, o.param_dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, o.dtype, o.param_dtype, "post_quant_conv")

    def encode(self, sample: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(B, 3, H, W) pixels in [-1, 1] -> (mean, logvar), each (B, C, H/f, W/f); logvar clipped to
        [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        moments = self.encoder(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.opts.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(jnp.transpose(moments, (0, 3, 1, 2)), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """(B, C, h, w) unscaled latents -> (B, 3, h*f, w*f) pixels (about [-1, 1], not clipped)."""
        x = jnp.transpose(z, (0, 2, 3, 1)).astype(self.opts.dtype)
        if self.config.use_post_quant_conv:
            x = self.post_quant_conv(x)
        return jnp.transpose(self.decoder(x), (0, 3, 1, 2))

    def latents(self, sample: jnp.ndarray) -> jnp.ndarray:
        """The posterior mean times the scaling factor: a deterministic encoding, what training reads."""
        return self.encode(sample)[0] * self.config.scaling_factor

    def images(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Scaled latents (what the U-Net samples) -> pixels, as the SDXL pipeline decodes them."""
        return self.decode(latents / self.config.scaling_factor)

    def __call__(self, sample: jnp.ndarray) -> jnp.ndarray:
        """Reconstruction through the posterior mean (touches every parameter: what `init` runs)."""
        return self.decode(self.encode(sample)[0])


@functools.lru_cache(maxsize=8)
def abstract_vae_params(config: VAEConfig) -> dict:
    """The VAE's params tree as ShapeDtypeStructs (jax.eval_shape: no memory); treat as read-only."""
    size = config.downscale_factor
    sample = jnp.zeros((1, config.in_channels, size, size), jnp.float32)
    return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), sample)["params"])
