"""What pretraining and fine-tuning share, one home each; nothing here imports deepspeed or triton at import time.

* `config_io`       the project's YAML dialect, strict loading of dataclass trees, `--section.key=value` overrides
* `atomic_io`       atomic, durable file writes (temporary name, fsync, rename)
* `checksums`       sha256 listings of folders (checkpoints, model folders) and their verification
* `distributed`     one process-group entry point for every launcher; the few collectives the loops need
* `optim`           AdamW parameter groups, seeding
* `deepspeed_json`  the DeepSpeed JSON, generated from typed settings (never written by hand)
"""
