"""cifar-mlflow: train and inspect CIFAR-10 image classifiers as a tracked MLflow Project.

Data flows one way: config -> data/augment -> models -> engine -> tracking (the only module that imports mlflow).
Nothing heavy is imported here, so `--help` stays fast.
"""

__version__ = "0.1.0"
