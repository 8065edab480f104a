"""Thin entry points started by torchrun, srun and the deepspeed launcher."""
