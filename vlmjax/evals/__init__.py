"""Evaluators: named entries `config.evals.<name> = {type, data, every, batch_size, ...}`.

  registry.py          the types (zero_shot, retrieval), entry validation, lazy construction
  data.py              each entry's data config and its examples, read on first use
  schedule.py          which evaluators run at a step
  embed.py             embeddings over the mesh in padded batches; the two-tower interface
  zero_shot.py, retrieval.py, imagenet_classes.py    the metrics and CLIP's ImageNet data
  presets.py           the entries the shipped configs use
  cli.py               python -m vlmjax.eval
"""
