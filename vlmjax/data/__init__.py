"""Data: everything between files on disk and a numpy batch dict.

Modules (see each docstring):
  shapes.py            the synthetic `vlm_shapes` TFDS builder (scene/render/text helpers beside it)
  build.py             `python -m vlmjax.data.build vlm_shapes --data_dir DIR`
  tokenizers.py        one interface over SentencePiece and HF `tokenizer.json` tokenizers
  preprocess.py        composable tf.data image/text ops chosen by config
  sources.py           TFDS, webdataset tar shards, LLaVA JSON, CSV/TSV, weighted mixtures
  filters.py, filter.py  ALIGN-style filtering of image-text pairs (`python -m vlmjax.data.filter`)
  pipeline.py          the per-host tf.data pipeline the trainer calls

Importing this package does not import TensorFlow; modules that need it import `tf_cpu`.
"""
