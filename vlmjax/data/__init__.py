"""Data: everything between files on disk and a numpy batch dict.

Modules (see each docstring):
  shapes.py            the synthetic `vlm_shapes` TFDS builder; shapes_scene / shapes_render /
                       shapes_text / shapes_noise / shapes_examples make its examples
  build.py             `python -m vlmjax.data.build vlm_shapes --data_dir DIR`
  export.py            `python -m vlmjax.data.export`: vlm_shapes as webdataset shards
  tokenizers.py        one interface over SentencePiece and HF `tokenizer.json` tokenizers
  preprocess.py        composable tf.data image/text ops chosen by config
  sources.py           TFDS, webdataset tar shards (webdataset.py), LLaVA JSON, CSV/TSV
  filters.py           ALIGN-style filtering of image-text pairs; align_filter.py: its corpus
                       CLI (`python -m vlmjax.data.align_filter`)
  skips.py             the reasons bad data is skipped for
  pipeline.py          the per-host tf.data pipeline the trainer calls (pipeline_config.py: its
                       config defaults and validation)

Importing this package does not import TensorFlow; modules that need it import `tf_cpu`.
"""
