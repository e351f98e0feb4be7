"""Data for KOALA distillation: ingest image-caption pairs, encode once, load with grain.

Importing this package loads only the torch-free loader; `koala_jax.data.prepare` is
imported explicitly by the preparation command (torch only for its PyTorch encoders;
`encoders_jax` is the JAX alternative).
"""

from koala_jax.data.loader import (
    CorruptRecordError,
    PreparedSource,
    SyntheticSource,
    TrainIterator,
    make_train_loader,
    open_source,
    to_global_batch,
)
from koala_jax.data.schema import load_null_embeddings

__all__ = [
    "CorruptRecordError",
    "PreparedSource",
    "SyntheticSource",
    "TrainIterator",
    "load_null_embeddings",
    "make_train_loader",
    "open_source",
    "to_global_batch",
]
