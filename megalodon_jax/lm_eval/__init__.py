"""lm-evaluation-harness support: the `megalodon` lm_eval model (`model.py`) and its arguments (`options.py`).

`python -m megalodon_jax.lm_eval` (`megalodon-lm-eval`) is lm_eval's own command line with the model registered
(cli/lm_eval.py). Nothing here is imported by the rest of the package; `lm_eval` inside these modules is the
top-level lm-eval package (absolute imports).
"""
