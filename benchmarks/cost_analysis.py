"""ERW cost analysis (the paper's Fig. 4): a thin wrapper over ``erw-bench cost``.

    python benchmarks/cost_analysis.py                       # SiT-XL/2, batch 256 → benchmarks/results/cost_analysis.*
    python benchmarks/cost_analysis.py --measure --model SiT-S/2 --input-size 8 --depth 2 --hidden 64 --heads 2 \
        --encoder demo-vit-t --resolution 64 --batch 4       # + timed steps per phase on this device
"""

import sys

from erw_fast.cli.bench import main

if __name__ == "__main__":
    sys.exit(main(["cost", *sys.argv[1:]]))
