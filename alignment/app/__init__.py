"""The application layer: the `alignment` command line. It may import `stages/` and `reward_models/`; the rest of
`alignment/` (the core) never imports them or this package (tests/test_layers.py)."""
