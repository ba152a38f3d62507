"""The command lines (train, generate, evaluate, convert, aot) and the flag handling they share; nothing else in
the package imports them (tests/test_import_graph.py)."""
