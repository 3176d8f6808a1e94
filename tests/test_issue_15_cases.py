"""Hostile input, round two (issue 15): the table of every case the issue listed, with the test that reproduces
it (in the module named for the behaviour) and the one line the user now gets (`{...}` stands for the run's own
paths and ids). Every case: a non-zero exit with that one line (no traceback), the MLflow run FAILED with a
`failure_reason` tag (never left RUNNING), nothing executed, nothing duplicated."""

from __future__ import annotations

import importlib

# (case of the issue, test (the module and the test), what the user gets: the one line after
# "error: ", or what happens instead). {path}, {run}, ... stand for the case's own values.
_UF = "tests/test_user_facing.py::"
_PIXELS = "expected float32 images (N, 3, 32, 32) with values in [0, 1] (pixel / 255)"
ISSUE_15 = [
    # Broken
    (
        "1. crafted dtype state in data_batch_1: SIGSEGV, run FAILED without a reason",
        "tests/test_crafted_data_files.py::test_crafted_dtype_state_fails_the_run_in_one_line",
        "{path}: not a readable CIFAR-10 pickle (refusing a u1 dtype whose pickled state is not numpy's plain one)",
    ),
    (
        "1. other crafted array states (structured/object dtype, short buffer, ndarray called, scalar)",
        "tests/test_crafted_data_files.py::test_other_crafted_array_states_are_refused",
        "{path}: not a readable CIFAR-10 pickle (refusing dtype 'V8': only plain numeric arrays are read), ...",
    ),
    (
        "2. a line appended to the model's code/cifar_mlflow/__init__.py ran on every pyfunc load",
        "tests/test_model_files.py::test_registered_model_ships_no_code_so_code_planted_in_the_store_never_runs",
        "(models name no code folder: a package planted beside the model is never imported)",
    ),
    (
        "2. README states what each loading path executes",
        "tests/test_model_files.py::test_mlmodel_naming_planted_code_runs_as_pyfunc_but_never_in_load_torch_model",
        "(the model's served_model.py, rewritten, runs under pyfunc as docs/security.md says; "
        "load_torch_model runs nothing)",
    ),
    (
        "3. two `mlflow run --run-id R` at once on a crashed run both trained and registered",
        "tests/test_run_leases.py::test_two_resumes_of_one_crashed_run_at_once_train_it_once",
        "run {run} is being trained by process {pid} on {host} (its lease runs until {hh:mm:ss} and is renewed while "
        "it trains); this process stops without touching it: wait for that one to end, or resume after it stops",
    ),
    (
        "3. the lease: refused untouched while held, free once released",
        "tests/test_run_leases.py::test_a_run_leased_to_a_live_process_is_refused_untouched",
        "(as above)",
    ),
    (
        "3. the lease lapses when its holder died here, or expired elsewhere",
        "tests/test_run_leases.py::test_a_lease_lapses_when_its_holder_is_gone_or_expired",
        "(claimed; a live holder elsewhere: as above)",
    ),
    (
        "3. claims racing for one run: exactly one wins",
        "tests/test_run_leases.py::test_of_threads_claiming_one_run_at_once_exactly_one_wins",
        "(one lease, the others as above)",
    ),
    (
        '4. -P "data_dir=/tmp/my data" failed every fresh run ("resume it ...")',
        "tests/test_run_parameters.py::test_value_that_needs_shell_quoting_works_in_a_fresh_mlflow_run",
        "(trains and registers)",
    ),
    (
        "4. the pipeline failed at its first step from a checkout whose path holds a space",
        "tests/test_pipeline.py::test_pipeline_runs_three_child_steps_then_reuses_them",
        "(three steps, a registered version)",
    ),
    (
        "4. a fresh run is not told to resume",
        "tests/test_run_parameters.py::test_parameters_mlflow_run_logged_differently_are_not_called_a_resume",
        "run {run}: `mlflow run` logged parameters that differ from those this process received: epochs (run: '3', "
        "now: 4)",
    ),
    (
        "5. registered_model_name=it's trained, registered, then failed",
        "tests/test_run_parameters.py::test_registered_model_name_is_checked_before_any_work[it's]",
        "registered_model_name=\"it's\" is not allowed: expected letters, digits, '_', '-' and '.', starting with a "
        "letter or digit (at most 256 characters)",
    ),
    (
        "5. registered_model_name=a/b failed after training",
        "tests/test_run_parameters.py::test_registered_model_name_is_checked_before_any_work[a/b]",
        "registered_model_name='a/b' is not allowed: expected letters, ... (as above)",
    ),
    (
        "5. registry searches quote a name holding a quote",
        "tests/test_model_files.py::test_search_filters_quote_names_holding_a_quote",
        "(found)",
    ),
    # Weak
    (
        "mutated data pickle: LookupError",
        "tests/test_crafted_data_files.py::test_mutated_pickles_are_one_line_data_errors[lookup]",
        "{path}: not a readable CIFAR-10 pickle (refusing _codecs.encode(..., 'nocodec'))",
    ),
    (
        "mutated data pickle: MemoryError",
        "tests/test_crafted_data_files.py::test_mutated_pickles_are_one_line_data_errors[memory]",
        "{path}: not a readable CIFAR-10 pickle (MemoryError)",
    ),
    (
        "mutated data pickle: batches.meta nested 100k deep, RecursionError",
        "tests/test_crafted_data_files.py::test_mutated_pickles_are_one_line_data_errors[deep]",
        "{path}: 'label_names' must list 10 class names (strings), got a list of length 1",
    ),
    (
        "model_config.json: mean of length 5",
        "tests/test_model_files.py::test_tampered_model_config_is_one_line[mean-of-5]",
        "{dir}/model_config.json: mean must be 3 numbers in [0, 1], one per RGB channel, got [0.5, 0.5, 0.5, 0.5, 0.5]",
    ),
    (
        "model_config.json: mean of strings",
        "tests/test_model_files.py::test_tampered_model_config_is_one_line[mean-strings]",
        '{dir}/model_config.json: mean must be 3 numbers in [0, 1], one per RGB channel, got ["a", "b", "c"]',
    ),
    (
        "model_config.json: wrong class count (message was cut at `Error(s) in loading state_dict`)",
        "tests/test_model_files.py::test_tampered_model_config_is_one_line[wrong-class-count]",
        "{dir}/weights.safetensors: not loadable weights for resnet18 (fc.weight has shape (10, 512); "
        "model_config.json's network (12 classes, batch norm) needs (12, 512))",
    ),
    (
        "model_config.json: 5 MB, a million class names (2.8 GB allocated)",
        "tests/test_model_files.py::test_huge_model_config_is_refused_before_parsing",
        "{dir}/model_config.json: {size} bytes is not a model config (at most 65,536); refused before parsing",
    ),
    (
        "(also) MLmodel pointing the data outside the model",
        "tests/test_model_files.py::test_mlmodel_pointing_the_data_outside_the_model_is_refused",
        "models:/tamper-me/1: its MLmodel points the model's data outside the model's folder; refused",
    ),
    (
        "resume: a truncated checkpoint did not fall back to the intact other slot",
        "tests/test_checkpoint_files.py::test_truncated_latest_slot_falls_back_to_the_other_slot",
        "(resumes from the other slot, saying: run {run}: checkpoints/slot-b/checkpoint.pt does not match the SHA-256 "
        "in checkpoints/latest.json; resuming from the other slot, checkpoints/slot-a/checkpoint.pt (epoch 1))",
    ),
    (
        "resume: manifest that is a list",
        "tests/test_checkpoint_files.py::test_malformed_manifest_is_one_line_and_not_followed[list]",
        "run {run}: its checkpoint manifest checkpoints/latest.json is malformed (a list, not an object); it was not "
        "followed. Restore it, or start a new run",
    ),
    (
        "resume: manifest without sha256",
        "tests/test_checkpoint_files.py::test_malformed_manifest_is_one_line_and_not_followed[no-sha256]",
        "... is malformed (it has no SHA-256 of 64 hex digits); ... (as above)",
    ),
    (
        "resume: manifest naming a folder",
        "tests/test_checkpoint_files.py::test_malformed_manifest_is_one_line_and_not_followed[folder]",
        "... is malformed (path 'checkpoints/slot-b' is not checkpoints/slot-b/checkpoint.pt, where epoch 2 "
        "belongs); ...",
    ),
    (
        "resume: manifest naming ../../<run>/... (was followed)",
        "tests/test_checkpoint_files.py::test_malformed_manifest_is_one_line_and_not_followed[outside]",
        "... is malformed (path '../../{run}/artifacts/checkpoints/slot-b/checkpoint.pt' is not "
        "checkpoints/slot-b/checkpoint.pt, where epoch 2 belongs); ...",
    ),
    (
        'resume: manifest with "epoch": "2"',
        "tests/test_checkpoint_files.py::test_malformed_manifest_is_one_line_and_not_followed[epoch-string]",
        "... is malformed (epoch '2' is not an integer >= 1); ...",
    ),
    (
        "resume: checkpoint without rng",
        "tests/test_checkpoint_files.py::test_checkpoint_without_rng_is_one_line",
        "run {run}: checkpoints/slot-b/checkpoint.pt: not a complete cifar-mlflow checkpoint (it lacks 'rng')",
    ),
    (
        "a resume that failed, then succeeded, kept the old failure_reason",
        "tests/test_checkpoint_files.py::test_killed_right_after_registration_then_resumed_registers_nothing_new",
        "(FINISHED, no failure_reason)",
    ),
    (
        "SIGKILL right after registration, then resume: a duplicate version 2",
        "tests/test_checkpoint_files.py::test_killed_right_after_registration_then_resumed_registers_nothing_new",
        "(no new version; the run tagged version 1, @champion on it; prints: run {run} already finished all 2 "
        "epochs and registered version 1; nothing to resume)",
    ),
    (
        "data_dir is a file",
        "tests/test_crafted_data_files.py::test_data_dir_that_cannot_hold_the_data[file]",
        "data_dir='{path}' is a file, not a folder; pass the folder that holds (or should receive) cifar-10-batches-py/",
    ),
    (
        "data_dir under a file",
        "tests/test_crafted_data_files.py::test_data_dir_that_cannot_hold_the_data[under-a-file]",
        "data_dir='{path}': cannot create the folder (a part of its path is a file)",
    ),
    (
        "data_dir unwritable",
        "tests/test_crafted_data_files.py::test_data_dir_that_cannot_hold_the_data[unwritable]",
        "data_dir='/sys' is not writable (Permission denied), so CIFAR-10 cannot be downloaded into it; choose a "
        "writable folder, or copy cifar-10-batches-py/ there",
    ),
    (
        "disk full during extraction left a half-extracted folder",
        "tests/test_crafted_data_files.py::test_disk_full_while_extracting_leaves_nothing_half_written",
        "{archive}: extracting into {folder} failed (File too large); free space or choose another data_dir, then run "
        "again",
    ),
    (
        "disk full mid-run: a 40-line traceback",
        "tests/test_checkpoint_files.py::test_disk_full_mid_run_is_one_line_and_fails_the_run",
        "cannot write the checkpoint of epoch 1 (the write failed: is the disk full?); free space, then resume the run "
        "(mlflow run --run-id {run})",
    ),
    (
        "MLFLOW_TRACKING_URI=foo://bar: a 63-line traceback after data preparation",
        "tests/test_tracking_stores.py::test_unknown_tracking_uri_is_one_line_before_any_work",
        "MLFLOW_TRACKING_URI='foo://bar' is not a tracking store MLflow can open (no store for its scheme); use "
        "sqlite:///<file>, postgresql://, mysql:// or http(s)://<server>",
    ),
    (
        "check_tracking_server ignored MLFLOW_TRACKING_TOKEN",
        "tests/test_tracking_stores.py::test_server_check_uses_mlflows_own_client_settings[wrong-token]",
        "tracking server {uri} refused the token in MLFLOW_TRACKING_TOKEN (HTTP 401)",
    ),
    (
        "check_tracking_server ignored the TLS settings",
        "tests/test_tracking_stores.py::test_server_check_uses_mlflows_own_client_settings[untrusted-tls]",
        "tracking server {uri} is unreachable (its TLS certificate is not trusted: set MLFLOW_TRACKING_SERVER_CERT_PATH "
        "to its CA bundle, or MLFLOW_TRACKING_INSECURE_TLS=true); start it, or point MLFLOW_TRACKING_URI at one that is "
        "up",
    ),
    (
        "serve: NaN answered 200 with NaN rows",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[nan]",
        f"HTTP 400: ... input holds 1 NaN or infinite values: {_PIXELS}",
    ),
    (
        "serve: Infinity",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[infinity]",
        f"HTTP 400: ... input holds 1 NaN or infinite values: {_PIXELS}",
    ),
    (
        "serve: null",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[null]",
        f"HTTP 400: ... input holds nulls, which are not pixel values: {_PIXELS}",
    ),
    (
        "serve: values outside [0, 1], ints (255)",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[int-255]",
        f"HTTP 400: ... input holds 1 values outside [0, 1], e.g. 255: {_PIXELS}",
    ),
    (
        "serve: negative values",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[negative]",
        f"HTTP 400: ... input holds 1 values outside [0, 1], e.g. -0.1: {_PIXELS}",
    ),
    (
        "serve: booleans",
        _UF + "test_served_model_refuses_values_that_are_not_pixels[bool]",
        f"HTTP 400: ... input holds booleans, which are not pixel values: {_PIXELS}",
    ),
    (
        'serve: "0.5"',
        _UF + "test_served_model_refuses_values_that_are_not_pixels[string]",
        f"HTTP 400: ... input holds strings, which are not pixel values: {_PIXELS}",
    ),
    (
        "serve: a 250 MB request: 504 after 60 s, the worker busy 90 s more",
        _UF + "test_served_model_refuses_an_oversized_request_before_computing",
        "HTTP 400 once parsed: ... a request of 1025 images is too large: at most 1024 per request (send several, or "
        "predict in-process with mlflow.pyfunc.load_model)",
    ),
    (
        "analyze -P target_layers=fc opened a run, then `Invalid grads shape`",
        "tests/test_model_files.py::test_target_layer_that_gradcam_cannot_explain_fails_before_a_run_opens",
        "target_layers: 'fc' outputs shape (1, 10) (a vector per image), not a convolutional feature map that GradCAM "
        "can explain; valid: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4 (or a dotted path inside one)",
    ),
    (
        "two runs at once into an empty folder: one died in MLflow's table creation",
        "tests/test_tracking_stores.py::test_two_runs_at_once_into_an_empty_folder_both_open_the_store",
        "(both open the store; plain `mlflow run`s: create the store first, docs/tracking-servers.md)",
    ),
]


def test_the_issue_table_names_tests_that_exist():
    for case, test, _ in ISSUE_15:
        path, _, name = test.rpartition("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name.split("[")[0], None)), (case, test)
