"""Ahead-of-time compilation for TPU slices and GPU hosts from a machine without them: `python -m megalodon_jax.aot`.

`topology` resolves target names to abstract devices, `programs` builds the train / prefill / decode programs as
the trainer and the generator do, `planner` compiles them and reads the compiler's memory report, `buffers`
explains it from XLA's buffer assignment; the command line is megalodon_jax/cli/aot.py.
"""
