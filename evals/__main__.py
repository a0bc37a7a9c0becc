"""``python -m evals``: lm-eval's own command line, with the ``neoxq`` model registered.

lm-eval 0.4 discovers no third-party models (no entry points), so ``lm_eval --model
neoxq`` alone cannot find us; this launcher imports :mod:`evals.harness` (which
registers ``neoxq``) and hands over to ``lm_eval.__main__.cli_evaluate``. Every lm-eval
flag works; add ``--include_path evals/lm_tasks`` for the offline LAMBADA/PIQA tasks
(``lambada_openai_local``, ``piqa_local``), which read the bundled data unless
``--metadata '{"data_dir": DIR}'`` names another copy.
"""

from __future__ import annotations


def main() -> None:
    """Register ``neoxq`` and run lm-eval's CLI on ``sys.argv``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    import evals.harness  # noqa: F401  (registers the "neoxq" model)

    # lm-eval's default batch size is 1, which for neoxq would mean one request per engine
    # call; "auto" lets each call fill the engine's token budget.
    if not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in sys.argv):
        sys.argv += ["--batch_size", "auto"]
    cli_evaluate()


if __name__ == "__main__":
    main()
