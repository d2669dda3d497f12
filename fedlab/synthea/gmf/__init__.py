"""A Generic Module Framework (GMF) interpreter for Synthea module JSON, in pure Python.

`fedlab.synthea.engine` is the public entry point; this package holds the parts:
`values` (time, randomness, distributions), `loader` (parsing and validation), `logic`
(conditions), `person` (the PersonState contract and a default), `record` (what a run writes),
`runtime` (states, transitions and the weekly loop).
"""
