"""MicroEP for Megatron-LM."""
