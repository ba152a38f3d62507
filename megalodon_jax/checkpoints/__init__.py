"""Checkpoints on disk: the one place that knows their Orbax layout, finds them and reads or writes them.

Below `training`, `inference` and `convert`, which all import from here (and nothing here imports them):
- `layout`: folder and item names, finished steps, file-level checks that read no arrays;
- `manager`: a training run's periodic async saves and resume (`Checkpointer`);
- `params`: params-only checkpoints, and the params of any checkpoint onto given shardings;
- `locate`: which folder a user's path means and the model config stored with it;
- `model_io`: a MegalodonLM from any checkpoint, and written as a params-only checkpoint;
- `errors`: `CheckpointError`, `ConvertError`.
Nothing is imported here, so `import megalodon_jax.checkpoints.layout` does not pull in orbax.
"""
