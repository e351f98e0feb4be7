"""Tiny diffusers U-Net configs that exercise every option the Flax U-Net supports, and a helper that
fills a PyTorch model with random weights (no zero biases, no unit norm scales) so parity tests can fail."""

from __future__ import annotations

import math

# SDXL layout in miniature: linear projections, per-block head counts, mid block, 3 stages.
SDXL_LIKE = {
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 48,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,
    "sample_size": 16,
}

# Everything else: 4 stages, conv projections, int head count, per-block layer counts, an explicit
# decoder depth list and no mid block.
NO_MID_CONV_PROJ = {
    "block_out_channels": [16, 32, 32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": None,
    "layers_per_block": [1, 2, 1, 1],
    "transformer_layers_per_block": [1, 2, 1, 1],
    "reverse_transformer_layers_per_block": [1, 1, 2, 1],
    "attention_head_dim": 4,
    "cross_attention_dim": 40,
    "use_linear_projection": False,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 16 + 6 * 4,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}

# A tiny SDXL-family teacher (two residual blocks per encoder stage, depth 4 at the deepest stage) from
# which KOALA students are derived in tests.
TINY_TEACHER = {**SDXL_LIKE, "transformer_layers_per_block": [1, 2, 4], "cross_attention_dim": 64,
                "projection_class_embeddings_input_dim": 32 + 6 * 8}


def randomize_(model, seed: int = 0):
    """Overwrite every parameter of a torch module with seeded random values of a sensible scale."""
    import torch  # here, so that the configs above import without torch (tests/train_worker.py)

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales around 1
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()

# The smallest SDXL-shaped U-Net (2 stages), for tests that compile gradients.
MICRO = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 16,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8 + 6 * 4,
}
