"""KOALA-1B from SDXL-Base 1.0 at 1024 px (mid block kept, depth 6 at the deepest stage)."""

from configs.common import sdxl_distillation_config


def get_config():
    return sdxl_distillation_config(
        "koala-1b", teacher="weights/sdxl-base", data="data/koala-1024", workdir="runs/koala_1b"
    )
