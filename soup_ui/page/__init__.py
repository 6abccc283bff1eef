"""The page: one visitor's view and its handlers as plain functions (`session`), the Gradio wiring
(`ui`) and custom widgets. Imports the engine and below; never serving (app.py wires the two) or the CLI.
"""
