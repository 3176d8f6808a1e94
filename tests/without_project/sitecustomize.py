"""On PYTHONPATH, this makes a Python process behave as on a machine where this project is not installed: importing
cifar_mlflow or entrypoints fails there, and so do the libraries only training needs. A model that any MLflow user
can load must load and serve in such a process (tests/test_stock_mlflow.py, the served model of
test_user_facing.py)."""

import importlib.abc
import sys

NOT_INSTALLED = frozenset(
    {
        "cifar_mlflow",
        "entrypoints",
        "torchvision",
        "safetensors",
        "albumentations",
        "pytorch_grad_cam",
        "torchinfo",
        "cv2",
        "optuna",
    }
)


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in NOT_INSTALLED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
