"""The experiment configs (Hydra groups: grid/, method/, world/, ...) and shipped prompt files. A package only so
that `pip install .` ships them beside `bench` (bench/runner/config.py and bench/worlds/prompts.py find them as
the folder next to bench/, in a checkout and in site-packages alike); nothing here is imported."""
