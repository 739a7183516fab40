"""The runtimes that drive the model: sampling, static-batch generation, attention-FFN
disaggregation (one process and several), the launcher, and the decode benchmark."""
