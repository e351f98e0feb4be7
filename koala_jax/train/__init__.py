"""KOALA distillation training: noise schedule, losses, sharding, train step and checkpoints.

`train.py` at the top level shows the data flow (data -> teacher & student -> losses -> update ->
checkpoint); the pieces it calls live here.
"""
