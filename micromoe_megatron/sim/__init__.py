"""Trace-driven simulator: what MicroEP and other balancing strategies buy on given routing counts.

Pure numpy + the planning core (no torch.distributed): ``counts`` reads and generates routing
counts, ``strategies`` turns one micro-batch's counts into per-GPU loads and traffic for each
strategy, ``cost`` converts those into milliseconds, ``simulate`` runs a whole comparison, and
``paper`` replays the paper's five model configurations.
"""
