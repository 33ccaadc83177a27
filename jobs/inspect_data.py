"""Check a dataset from inside the cluster: ``ray job submit -- python jobs/inspect_data.py --config configs/X.yaml``.

Same options as ``hotdog inspect``; exits 2 with one line when the dataset is unusable.
"""

import sys

from hotdog_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
