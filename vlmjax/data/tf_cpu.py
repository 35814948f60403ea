"""TensorFlow for input pipelines only: import it through here so it never takes an accelerator.

JAX owns the GPUs/TPUs; a TensorFlow that grabs GPU memory first would starve it.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

__all__ = ["tf"]
