"""The studio engine: the weight pool (`pool`), a mix as one value (`mix`), merging into the hybrid
(`mixer`), rendering (`render`), the studio that holds them (`studio`), the paper's workflows, exports
and streamed exports, labelled sheets. Runtime options (`runtime`) import nothing heavy. Imports the
maths and the model files; never the page, serving or the CLI.
"""
