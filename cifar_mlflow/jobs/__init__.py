"""The entry points' work, one module each (`entrypoints/` holds only their click commands): config -> data ->
model -> engine, reported through cifar_mlflow.tracking.

- train: the `main` entry point (and `ddp`, the same under torchrun);
- lr_find: the `lr_find` entry point, and the `lr=auto` step of training;
- analyze: the `analyze` entry point;
- pipeline: the `pipeline` entry point (lr_find -> main -> analyze as child runs);
- sweep: the `sweep` entry point (an Optuna study whose trials train as child runs through train.train).
"""
