"""KOALA-Turbo-700M: the SDXL-Turbo U-Net as teacher at 512 px (SDXL-Turbo generates at 512 px; the
paper measures KOALA-Turbo at 512x512; its training resolution is not stated, see docs/paper.md).

What changes against koala_700m: the teacher weights and 512 px data (64x64 latents, prepared with
`prepare_data.py --resolution 512`). SDXL-Turbo keeps epsilon prediction and SDXL's schedule; it was
trained at the 4 timesteps (999, 749, 499, 249), which `noise.timesteps` can restrict training to.
"""

from configs.common import sdxl_distillation_config


def get_config():
    c = sdxl_distillation_config(
        "koala-700m", teacher="weights/sdxl-turbo", data="data/koala-512", workdir="runs/koala_turbo_700m"
    )
    c.data.synthetic.latent_size = 64
    return c
