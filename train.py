"""Entry point: `python train.py --config configs/demo.yaml`, `torchrun train.py …`, `deepspeed train.py …`."""

import sys

from erw_fast.errors import one_line_errors
from erw_fast.trainer import main, parse_args

if __name__ == "__main__":
    # A bad file or a full disk ends in one line naming it (a config error already does, in main); --debug: traceback
    sys.exit(one_line_errors(main, debug=parse_args().debug))
