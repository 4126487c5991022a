"""Entry point: `python train.py --config configs/demo.yaml`, `torchrun train.py …`, `deepspeed train.py …`."""

import sys

from erw_fast.trainer import main

if __name__ == "__main__":
    sys.exit(main())
