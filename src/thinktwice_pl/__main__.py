"""``python -m thinktwice_pl``: the ``thinktwice`` command."""

from thinktwice_pl.cli import main

if __name__ == "__main__":  # guarded: spawned grader workers re-import the main module
    main()
