"""``mvsdi bench``: the benchmark matrix (presets × prompts × seeds), run locally or on Ray, and its tables.

matrix    the cells, their run directories and when a cell is done
cells     running and measuring one cell (what a worker does)
executors local worker processes (one per GPU) and Ray tasks
aggregate tables and paired differences, from the files alone; plots, gallery: the figures and HTML
cli       the subcommand

See docs/benchmark.md.
"""
