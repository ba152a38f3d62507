"""Training configs: `python train.py --config configs/<name>.py`. default.py documents every field."""
