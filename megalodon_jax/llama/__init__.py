"""The Llama-style baseline family (`--config.model.family=llama`): config, model and FLOP counts."""
