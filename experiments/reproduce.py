"""Small-scale reproduction of the paper's comparison (Tables 2–3, Figures 5–6); the same as `cosmoes reproduce`.

    python experiments/reproduce.py --steps 2000 --out runs/reproduce --results docs/results

Trains FA dense, MoE, MoE + BlES, WD-MoE and PA dense on the embedded corpus with shared hyper-parameters,
scores them on the same held-out blocks and routing sample, and writes docs/results/reproduction.md with plots.
Models already trained in OUT with the same settings are skipped, so an interrupted run can be started again.
All options: `cosmoes reproduce --help`; the logic is `cosmoes.repro.reproduce.run_reproduction`.
"""

import sys

from cosmoes.cli import main

if __name__ == "__main__":
    sys.argv = ["cosmoes", "reproduce", *sys.argv[1:]]
    main()
