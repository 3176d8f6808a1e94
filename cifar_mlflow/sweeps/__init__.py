"""A sweep's search, knowing nothing of MLflow: its parameters (sweep_config), its search space (default or a YAML
file), the Optuna study shared by workers (studies) and its storage, heartbeats and retries (study_storage)."""
