#!/usr/bin/env python
"""GPT-MoE pretraining with Megatron's training loop; add --micro-ep D to switch MicroEP on.

    torchrun --nproc-per-node 8 scripts/pretrain_gpt.py <Megatron arguments> --micro-ep 2

See micromoe_megatron/pretrain_gpt.py and the README.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from micromoe_megatron.training.pretrain_gpt import main  # noqa: E402

if __name__ == "__main__":
    main()
