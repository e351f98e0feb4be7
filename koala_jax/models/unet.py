"""UNet2DConditionModel for the SDXL family, as diffusers' unet_2d_condition.py.

Inputs and outputs use diffusers' NCHW layout; inside, the network runs NHWC (what XLA's convolutions
prefer on TPU and GPU). Parameter paths read like diffusers state-dict keys with `.N` written `_N`:
`down_blocks_1/attentions_0/transformer_blocks_1/attn1/to_q/kernel`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koala_jax.models.common import FEATURES, ForwardOptions, conv, group_norm
from koala_jax.models.config import UNetConfig
from koala_jax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from koala_jax.models.naming import flax_path_to_torch_module
from koala_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock


class UNet2DConditionModel(nn.Module):
    """The conditional U-Net. `config` is the architecture, `opts` how to compute it."""

    config: UNetConfig
    opts: ForwardOptions = ForwardOptions()

    def _stage_kwargs(self, i: int, num_layers: int, depths: tuple[int, ...]) -> dict:
        """Fields of a stage at resolution level `i` (0 = full resolution) with per-layer `depths`."""
        cfg = self.config
        return dict(
            out_channels=cfg.block_out_channels[i],
            num_layers=num_layers,
            depths=depths,
            heads=cfg.num_attention_heads[i],
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            use_linear_projection=cfg.use_linear_projection,
            opts=self.opts,
        )

    def _embed(
        self, timesteps: jnp.ndarray, batch: int, text_embeds: jnp.ndarray | None, time_ids: jnp.ndarray | None
    ) -> jnp.ndarray:
        """temb = MLP(sinusoid(t)) [+ MLP(text_embeds ++ sinusoid(time_ids)) for 'text_time']."""
        cfg, o = self.config, self.opts
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, o.dtype, o.param_dtype, name="time_embedding")(
            t_emb.astype(o.dtype)
        )
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this U-Net has addition_embed_type='text_time': pass text_embeds and time_ids")
            time_embeds = get_timestep_embedding(
                time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            ).reshape(batch, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(o.dtype)
            emb = emb + TimestepEmbedding(cfg.time_embed_dim, o.dtype, o.param_dtype, name="add_embedding")(add)
        return emb

    @nn.compact
    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray,
        encoder_hidden_states: jnp.ndarray,
        text_embeds: jnp.ndarray | None = None,
        time_ids: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """sample (B, C, H, W), timesteps () or (B,), encoder_hidden_states (B, L, D), text_embeds (B, P),
        time_ids (B, 6) -> the prediction (B, C, H, W) in the compute dtype."""
        cfg, o = self.config, self.opts
        n = len(cfg.block_out_channels)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(o.dtype)
        context = encoder_hidden_states.astype(o.dtype)
        temb = self._embed(timesteps, x.shape[0], text_embeds, time_ids)

        x = conv(cfg.block_out_channels[0], 3, o.dtype, o.param_dtype, "conv_in")(x)
        skips: list[jnp.ndarray] = [x]
        for i in range(n):
            block = DownBlock(
                **self._stage_kwargs(i, cfg.layers_per_block[i], cfg.down_depths(i)),
                add_downsample=i < n - 1,
                name=f"down_blocks_{i}",
            )
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)

        if cfg.mid_block_type is not None:
            depths = cfg.mid_depths()
            x = MidBlock(**self._stage_kwargs(n - 1, len(depths), depths), name="mid_block")(x, temb, context)

        # diffusers forwards explicit upsample sizes when H or W is not a multiple of the total stride.
        forward_sizes = any(d % 2 ** (n - 1) for d in sample.shape[2:])
        for i in range(n):
            num_layers = cfg.up_layers_per_block[i]
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            upsample_size = tuple(skips[-1].shape[1:3]) if forward_sizes and i < n - 1 else None
            block = UpBlock(
                **self._stage_kwargs(n - 1 - i, num_layers, cfg.up_depths(i)),
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
            )
            x = block(x, block_skips, temb, context, upsample_size)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, o.dtype, o.param_dtype, "conv_norm_out")(x))
        x = conv(cfg.out_channels, 3, o.dtype, o.param_dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def apply_with_features(self, variables: dict, *args, **kwargs) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Forward pass that also returns the features named in `opts.capture`, keyed by diffusers
        module path (e.g. 'up_blocks.0.attentions.1.transformer_blocks.3.attn1').

        Attention and feed-forward features are tokens (B, H*W, C); resnet and stage features are
        NHWC (B, H, W, C), the layout the network computes in.
        """
        out, state = self.apply(variables, *args, mutable=[FEATURES], **kwargs)
        return out, flatten_features(state.get(FEATURES, {}))


def flatten_features(tree: dict, prefix: tuple[str, ...] = ()) -> dict[str, jnp.ndarray]:
    """{'down_blocks_1': {'resnets_0': {'output': x}}} -> {'down_blocks.1.resnets.0': x}."""
    flat = {}
    for key, value in tree.items():
        if key == "output":
            flat[flax_path_to_torch_module(prefix)] = value
        else:
            flat.update(flatten_features(value, prefix + (key,)))
    return flat
