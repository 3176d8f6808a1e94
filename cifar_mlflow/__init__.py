"""cifar-mlflow: train and inspect CIFAR-10 image classifiers as a tracked MLflow Project.

Data flows one way: config -> data -> models -> training -> tracking (the only package that imports mlflow), with
analysis/ and sweeps/ beside training; jobs/ holds each entry point's work. README "Architecture" says which
module owns what. Nothing heavy is imported here, so `--help` stays fast.
"""

__version__ = "0.1.0"
