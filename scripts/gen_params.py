"""Write the MLproject file and the docs pages' parameter tables (docs/*.md) from cifar_mlflow/config.py and
sweeps/sweep_config.py.

python scripts/gen_params.py           # rewrite what is stale
python scripts/gen_params.py --check   # exit 1 naming each stale file, write nothing
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

from cifar_mlflow import params_doc  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
args = parser.parse_args()
stale = params_doc.stale(write=not args.check)
for name in stale:
    print(f"{name} is stale: run python scripts/gen_params.py" if args.check else f"rewrote {name}")
sys.exit(1 if stale and args.check else 0)
