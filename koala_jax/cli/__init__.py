"""The four commands (train, convert, sample, prepare): argument parsing and one error policy
(`runner.run`). The top-level scripts train.py, convert_weights.py, sample.py and prepare_data.py are
shims that call these."""
