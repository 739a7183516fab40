"""Checkpoints: the Hub safetensors reader/writer, the orbax store, convert/export, and the
loading pipeline (source -> host pytree -> runtime layout -> placement)."""
