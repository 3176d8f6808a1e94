"""Training, knowing nothing of MLflow: the setup built before a run opens (prepare), augmentation, device and
precision (hardware), the one step and the one inference loop, optimiser and schedule, the epoch loop (engine), the
training state a checkpoint holds, torchrun collectives, stopping between steps, and the LR range test."""
