"""Serving: Ray Serve render workers (`workers`) that render and export what the page asks. Imports
the engine and below; never the page or the CLI.
"""
