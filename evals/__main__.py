"""``python -m evals``: lm-eval's own command line, with the ``neoxq`` model registered.

lm-eval 0.4 discovers no third-party models (no entry points), so ``lm_eval --model
neoxq`` alone cannot find us; this launcher imports :mod:`evals.harness` (which
registers ``neoxq``) and hands over to ``lm_eval.__main__.cli_evaluate``. Every lm-eval
flag works; add ``--include_path evals/lm_tasks --metadata '{"data_dir": DIR}'`` for the
offline LAMBADA/PIQA tasks (``lambada_openai_local``, ``piqa_local``).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import evals.harness  # noqa: F401  (registers the "neoxq" model)

    cli_evaluate()


if __name__ == "__main__":
    main()
