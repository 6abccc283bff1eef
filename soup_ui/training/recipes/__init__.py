"""Recipes that build the project's shipped models from data (see `emoji.py`)."""
