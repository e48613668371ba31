"""Training and evaluation: the run config (config), the rows (sources) and their formatting (data), the accelerate
loop (loop) with its checkpoints, reporting and optimizer groups (optim), scoring (evaluate), and the transformers
Trainer / TRL integration (hf_trainer)."""
