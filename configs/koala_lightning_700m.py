"""KOALA-Lightning-700M: the SDXL-Lightning U-Net as teacher (the released run distilled the 4-step
Lightning U-Net on LAION-POP at 1024 px; docs/paper.md).

What changes against koala_700m: only the teacher weights. SDXL-Lightning keeps SDXL's epsilon
prediction and noise schedule. Training timesteps stay uniform over all 1000 (the student is sampled
with 10 trailing Euler steps, which visit timesteps the 4-step teacher never saw in its own sampling);
`--config.noise.timesteps="(999, 749, 499, 249)"` restricts them to the teacher's own 4 steps.
"""

from configs.common import sdxl_distillation_config


def get_config():
    return sdxl_distillation_config(
        "koala-700m",
        teacher="weights/sdxl-lightning-4step",
        data="data/laion-pop-1024",
        workdir="runs/koala_lightning_700m",
    )
