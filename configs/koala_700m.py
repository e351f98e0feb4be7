"""KOALA-700M from SDXL-Base 1.0 at 1024 px. Teacher: `python convert_weights.py to-jax --src
<sdxl-base folder> --out weights/sdxl-base`; data: `prepare_data.py --resolution 1024 --output-dir data/koala-1024`."""

from configs.common import sdxl_distillation_config


def get_config():
    return sdxl_distillation_config(
        "koala-700m", teacher="weights/sdxl-base", data="data/koala-1024", workdir="runs/koala_700m"
    )
