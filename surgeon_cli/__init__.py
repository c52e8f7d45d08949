"""The ``surgeon`` command line, on top of the library: ``main`` holds the typer app and the entry point, one module
per command group (``models``: fetch-model, eval, make-task; ``prune``: prune, sweep; ``outputs``: materialize,
report, verify; ``registry``: promote; ``bench``: bench) and ``common`` what they share.

Only this package imports the Prefect flows (``flows``); the library (``surgeon``, ``surgeon_core``) and the flows
never import it. Commands import what they run inside their function, so ``surgeon --help`` starts without torch,
transformers or Prefect, and Prefect is first imported after :func:`surgeon_cli.common.pipeline_env` has set its
environment."""
