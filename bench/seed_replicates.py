"""Training-seed replicates in one table (learner/reports/replicates.py): mean ± spread over training seeds, and
same-seed length-matched pairs between two methods.

    python -m bench.seed_replicates --work runs/table1-healed --base sft \\
        --group minillm=minillm,minillm-s20,minillm-s30 --group control=sft-more,sft-more-s20,sft-more-s30 \\
        --pair minillm:control
"""

import sys

from learner.reports.replicates import main

if __name__ == "__main__":
    sys.exit(main())
