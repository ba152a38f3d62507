"""Default training configuration: every field, commented. Other configs start from this one and override.

Run: `python train.py --config configs/default.py --config.total_steps=1000`. Any field can be overridden on the
command line as `--config.<key>=<value>` (nested: `--config.model.num_layers=4`, `--config.data.path=...`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------- model: MegalodonConfig, official ModelConf names (docs/model.md#configurations) ---------------
  m = c.model = ml_collections.ConfigDict()
  m.num_layers = 4  # number of Megalodon blocks
  m.model_dim = 256  # D, residual width
  m.z_dim = 64  # Z, shared query/key width (all heads)
  m.value_dim = 512  # E, value width (all heads)
  m.num_heads = 1  # H; z_dim and value_dim are split across heads
  m.ffn_hidden_dim = 512  # F, feed-forward hidden width
  m.cema_ndim = 16  # N, complex EMA order per feature
  m.chunk_size = 256  # C, attention chunk; training seq_len must be a multiple of it (or shorter)
  m.efficient_attn = None  # None (plain softmax dropout) | "swift" | "fused" (DropKey attention dropout)
  m.init_mode = "he"  # he | bert | gaussian | xavier | none: initialisation of the linear layers
  m.vocab_size = -1  # -1: taken from the tokenizer (256 for bytes); or a fixed size >= the tokenizer's
  m.output_size = -1  # LM head size; -1 = vocab_size
  m.norm_num_groups = 32  # TimestepNorm / group count; must divide model_dim
  m.norm_affine = True  # learnable scales in the norms
  m.norm_eps = 1e-5  # epsilon of all norms
  m.rope_base = None  # None = 10000; the paper's 7B uses 1e5
  m.dropout = 0.0  # embedding and block output dropout
  m.hidden_dropout = 0.0  # dropout inside attention / FFN hidden layers
  m.attention_dropout = 0.0  # dropout on attention weights (DropKey with efficient_attn)
  m.swiglu = False  # SwiGLU feed-forward instead of SiLU MLP
  m.rescale_nffn = False  # learnable residual rescale in the FFN
  m.scale_emb = False  # multiply embeddings by sqrt(model_dim)
  m.share_emb = False  # tie the LM head to the embedding
  m.layerwise_ckpt = False  # official flag: remat every block (used when remat == "auto")
  # Execution settings (ours; never change the math beyond float rounding):
  m.dtype = "bfloat16"  # activation / matmul dtype; CEMA, norms, softmax and the loss stay float32
  m.param_dtype = "float32"  # master parameters and optimizer state
  # default | high | highest: precision of the model's matmuls / einsums. "default" keeps jax's setting (on TPU one
  # bfloat16 pass for float32 operands); float32 parity with the official model on TPU needs "highest".
  m.matmul_precision = "default"
  m.cema_impl = "auto"  # auto | fft | associative_scan | sequential | chunked | pallas
  m.attention_impl = "auto"  # auto (= xla until the kernels are measured on hardware) | xla | pallas
  m.remat = "auto"  # auto (from layerwise_ckpt) | none | full | dots_saveable: jax.checkpoint policy per block
  m.scan_layers = False  # one lax.scan over the blocks: compile time flat in depth (same params, same results)

  # ---------------- data (megalodon_jax/data) ----------------
  d = c.data = ml_collections.ConfigDict()
  # stdlib (built-in corpus: this Python's standard library sources) | text_files | jsonl | enwik8 | tfds
  d.dataset = "stdlib"
  d.path = ""  # text_files / jsonl: file path(s), folder(s) or glob(s), comma separated (jsonl: plain, .gz or .zst)
  d.manual_dir = ""  # enwik8: folder holding enwik8 or enwik8.zip (downloaded there if absent and online)
  d.name = ""  # tfds: a prepared TFDS dataset name, e.g. "pg19" or "lm1b" (array_record format)
  d.text_key = "text"  # tfds: the feature holding the text; jsonl: the JSON field holding it
  d.data_dir = ""  # where TFDS datasets are prepared / read; "" = TFDS default (~/tensorflow_datasets)
  d.train_split = "train"  # split used for training
  d.eval_split = "validation"  # split used for periodic evaluation
  # stdlib / text_files / jsonl: % held out for validation: whole files by path hash, or, when that leaves a split
  # without a file (e.g. one file), the last % of every file (text: bytes cut at a line start; jsonl: records)
  d.validation_percent = 5
  d.max_documents = 0  # stdlib / text_files / jsonl: use only the first N files in path order; 0 = all
  d.tokenizer = "bytes"  # bytes (vocab 256, utf-8 bytes) | sentencepiece
  d.tokenizer_path = ""  # sentencepiece: the .model file (e.g. Llama-2's tokenizer.model)
  d.add_eos = True  # append the tokenizer's EOS id after each document when it has one (bytes: none)
  d.worker_count = 0  # grain worker processes (0 = in the main process)
  # carry: CEMA / norm / attention state flows across the documents packed in a window (official) | reset: the
  # model restarts at every document start and the loss skips predicting a document's first token
  d.document_boundaries = "carry"

  # ---------------- batch and schedule ----------------
  c.seed = 0  # parameter init, data order and dropout all derive from it
  c.seq_len = 1024  # training sequence length in tokens
  c.batch_size = 8  # global batch in sequences per optimizer step (split over data x fsdp devices)
  c.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
  c.total_steps = 1000  # optimizer steps of the run (and the length of the LR schedule)
  # Positions whose logits exist at once in the loss (the largest divisor of seq_len not above it); 0 = all. Keeps
  # the (batch, seq_len, vocab) float32 logits and their gradient from ever being whole in memory.
  c.loss_piece = 2048

  # ---------------- optimizer (official AdamW + LambdaLR, megalodon_jax/training/optimizer.py) ----------------
  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 1e-3  # peak learning rate
  o.warmup_steps = 100  # linear warmup steps
  o.scheduler = "cosine"  # linear | cosine | constant: decay after warmup
  o.init_ratio = 1e-4  # lr multiplier at step 0 (official default)
  o.end_ratio = 0.1  # lr multiplier reached at total_steps
  o.cycles = 1.0  # cosine half-periods over the decay
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.1  # decoupled weight decay
  o.decay_mask = "all"  # all (official: every parameter) | matrices (only ndim >= 2)
  o.clip = 1.0  # global gradient-norm clip; 0 disables

  # ---------------- mesh and sharding ----------------
  # Device mesh axes (data, sequence, fsdp, tensor); one size may be -1 (= all remaining devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data parallelism (replicated params)
  c.mesh.fsdp = -1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
  # Chunk parallelism: the length split over this many devices, each a contiguous slice of whole chunks (seq_len a
  # multiple of sequence x chunk_size); context grows with the chips. Parameters are replicated over it.
  c.mesh.sequence = 1
  c.mesh.tensor = 1  # tensor parallelism over vocab / value / qk / mlp widths
  # Logical parameter axis -> mesh axis (or None = replicated). A dimension not divisible by its mesh axis size
  # stays replicated. Names: vocab, embed, embed_out, value, qk, mlp, cema_ndim, cema (CEMA's model-width axis) and norm
  # (norm scales and biases). Activations have their own fixed layout (megalodon_jax/ops/partitioning.py).
  c.logical_axis_rules = (
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("embed_out", "tensor"),
      ("value", "tensor"),
      ("qk", "tensor"),
      ("mlp", "tensor"),
      ("cema_ndim", None),
      ("cema", None),  # small; sharding them over fsdp makes XLA gather all chips' partial gradients at once
      ("norm", None),
  )

  # ---------------- checkpoints (Orbax, workdir/checkpoints) ----------------
  c.checkpoint_every = 500  # save every N steps (and at the end, and on SIGTERM)
  c.checkpoint_keep = 3  # keep the last K checkpoints
  c.async_checkpointing = True  # save in the background while training continues
  c.init_from = ""  # a params-only checkpoint to start from when workdir has none (see README)

  # ---------------- observability ----------------
  c.log_every = 10  # write metrics (metrics.jsonl, TensorBoard, console) every N steps
  c.eval_every = 200  # evaluate on data.eval_split every N steps (and at the end); 0 disables
  c.eval_batches = 8  # batches (of batch_size sequences) per evaluation
  c.num_samples = 2  # generated samples printed and logged at each evaluation; 0 disables
  c.sample_len = 128  # tokens generated per sample
  c.sample_prompt = ""  # prompt for the samples ("" = a validation sequence's first 32 tokens)
  c.sample_temperature = 0.8  # sampling temperature (0 = greedy)
  c.tensorboard = True  # write TensorBoard event files to workdir/tensorboard
  c.progress_bar = "auto"  # auto (on a terminal) | on | off
  c.stop_on_nan = True  # stop at the first non-finite loss, keeping the last good checkpoint
  return c
