"""The page: one visitor's view and its handlers as plain functions (`session`), the main panels
(`panels`), the workflow tabs (`tabs`), the "Find the soup" tab (`find`), the HTTP API (`api`) and the
pieces they share (`parts`, `widgets`), assembled by `ui`. Imports the search, the engine and below;
never serving (app.py wires the two) or the CLI.
"""
