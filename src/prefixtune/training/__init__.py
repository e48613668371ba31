"""Training and evaluation: the run config (config), data loading and formatting (data), the accelerate loop
(loop), scoring (evaluate) and the transformers Trainer / TRL integration (hf_trainer)."""
